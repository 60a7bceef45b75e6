/**
 * `dppa job create`'s flags parsed into the proto messages (DpaConfig,
 * MergeOptions), the SDK's checks of a job request, and the JSON views of jobs
 * and events (states as lower-case words).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { UsageError } from '../client/cli/exit-codes.js';
import { execFileSync } from 'node:child_process';
import { parseScores, shellQuote } from '../client/cli/eval-command.js';
import { parseDpa, parseEvaluator, parseParties, parseWeights } from '../client/cli/job-flags.js';
import { eventJson, eventText, jobJson, jobText } from '../client/cli/job-view.js';
import { createJobRequest, jobStateName } from '../client/sdk/jobs.js';
import { DpaConfig, EvaluatorKind, Job, JobState, SearchMethod, Tuner } from '../proto/gen/dppa/v1/jobs.js';

const parties = ['a', 'b', 'c'];

function usage(fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (e: unknown) => e instanceof UsageError && message.test(e.message), message.source);
}

describe('--parties', () => {
  it('splits and checks names', () => {
    assert.deepEqual(parseParties('math,law, code'), ['math', 'law', 'code']);
    usage(() => parseParties(undefined), /^--parties is required/);
    usage(() => parseParties('a,a'), /^--parties: a is given twice/);
    usage(() => parseParties('a,b c'), /^--parties: "b c" is not a party name/);
    usage(() => parseParties('a,'), /^--parties: "" is not a party name/);
    usage(() => parseParties('x'.repeat(65)), /is not a party name/);
  });
});

describe('--dpa', () => {
  it('off by default and as a word', () => {
    assert.deepEqual(parseDpa(undefined, parties), { off: true });
    assert.deepEqual(DpaConfig.fromPartial(parseDpa('off', parties)), {
      off: true,
      fixed: undefined,
      search: undefined,
      scaleOutsideByMax: false,
    });
  });

  it('fixed factors for every party, per party, or both', () => {
    assert.deepEqual(parseDpa('fixed:1.8,1.2,1', parties), { fixed: { factors: [1.8, 1.2, 1], perParty: {} } });
    assert.deepEqual(parseDpa('fixed:a=1.5,1;b=2,1;c=1,1', parties), {
      fixed: { factors: [], perParty: { a: { factors: [1.5, 1] }, b: { factors: [2, 1] }, c: { factors: [1, 1] } } },
    });
    const mixed = DpaConfig.fromPartial(parseDpa('fixed:1.2,1;b=2,1', parties));
    assert.deepEqual(mixed.fixed, { factors: [1.2, 1], perParty: { b: { factors: [2, 1] } } });
  });

  it('search with defaults or settings', () => {
    assert.deepEqual(parseDpa('search', parties), { search: {} });
    const s = DpaConfig.fromPartial(
      parseDpa(
        'search:method=whole,tuner=golden,start=1.8,step=0.05,upper=4,lower=0.5,budget=20,downward,party-timeout=120',
        parties,
      ),
    ).search!;
    assert.equal(s.method, SearchMethod.SEARCH_METHOD_WHOLE);
    assert.equal(s.tuner, Tuner.TUNER_GOLDEN);
    assert.deepEqual(
      [s.start, s.step, s.upper, s.lower, s.budget, s.downward, s.partyTimeoutSeconds],
      [1.8, 0.05, 4, 0.5, 20, true, 120],
    );
  });

  it('names what is wrong', () => {
    usage(() => parseDpa('on', parties), /^--dpa: expected off, fixed:F1,F2,…/);
    usage(() => parseDpa('fixed:', parties), /^--dpa: no factors for every party/);
    usage(() => parseDpa('fixed:1,x', parties), /^--dpa: expected a number ≥ 0, got "x"/);
    usage(() => parseDpa('fixed:1,-1', parties), /^--dpa: expected a number ≥ 0, got "-1"/);
    usage(() => parseDpa('fixed:a=1,1;b=1,1', parties), /^--dpa: no factors for c/);
    usage(() => parseDpa('fixed:a=1;z=1;1', parties), /^--dpa: "z" is not one of --parties \(a, b, c\)/);
    usage(() => parseDpa('fixed:a=1;a=2;1', parties), /^--dpa: factors for a are given twice/);
    usage(() => parseDpa('fixed:1;2', parties), /^--dpa: the default factors .* are given twice/);
    usage(() => parseDpa('search:method=random', parties), /^--dpa: search method: expected progressive or whole/);
    usage(() => parseDpa('search:budget=1.5', parties), /^--dpa: search budget: expected an integer/);
    usage(() => parseDpa('search:speed=2', parties), /^--dpa: unknown search setting "speed"/);
  });
});

describe('evaluator flags of --dpa search', () => {
  it('parse into SearchConfig fields', () => {
    assert.deepEqual(parseEvaluator({}, parties, true), {});
    assert.deepEqual(parseEvaluator({ evaluator: 'remote' }, parties, true), {
      evaluator: EvaluatorKind.EVALUATOR_KIND_REMOTE,
    });
    const s = parseEvaluator(
      {
        evaluator: 'onnx',
        'party-evaluator': 'c=remote',
        'onnx-model': '/m.onnx',
        'onnx-tokenizer': '/tok.json',
        'onnx-tasks': ['a:gsm=/a/gsm.jsonl,a:arith=/a/ar.jsonl', 'b:bar=/b/bar.jsonl'],
        'onnx-finetuned': ['a=/ft/a,b=/ft/b'],
        'ort-provider': 'cuda',
        metric: 'log_likelihood',
      },
      parties,
      true,
    );
    assert.deepEqual(s, {
      evaluator: EvaluatorKind.EVALUATOR_KIND_ONNX,
      partyEvaluator: { c: EvaluatorKind.EVALUATOR_KIND_REMOTE },
      onnx: {
        modelPath: '/m.onnx',
        tokenizerPath: '/tok.json',
        provider: 'cuda',
        metric: 'log_likelihood',
        partyTasks: {
          a: { tasks: { gsm: '/a/gsm.jsonl', arith: '/a/ar.jsonl' } },
          b: { tasks: { bar: '/b/bar.jsonl' } },
        },
        partyFinetuned: { a: '/ft/a', b: '/ft/b' },
      },
    });
  });

  it('names what is wrong', () => {
    usage(() => parseEvaluator({ evaluator: 'onnx' }, parties, false), /^--evaluator: only with --dpa search/);
    usage(
      () => parseEvaluator({ evaluator: 'gpu' }, parties, true),
      /^--evaluator: expected remote or onnx, got "gpu"/,
    );
    usage(
      () => parseEvaluator({ 'party-evaluator': 'z=onnx' }, parties, true),
      /^--party-evaluator: "z" is not one of --parties/,
    );
    usage(
      () => parseEvaluator({ 'onnx-tasks': ['a=/x.jsonl'] }, parties, true),
      /^--onnx-tasks: expected party:task=FILE, got "a=\/x.jsonl"/,
    );
    usage(
      () => parseEvaluator({ 'onnx-tasks': ['a:t=/x,a:t=/y'] }, parties, true),
      /^--onnx-tasks: task t of a is given twice/,
    );
    usage(
      () => parseEvaluator({ 'onnx-finetuned': ['a'] }, parties, true),
      /^--onnx-finetuned: expected party=DIR, got "a"/,
    );
    usage(() => parseEvaluator({ 'ort-provider': 'tpu' }, parties, true), /^--ort-provider: expected cpu or cuda/);
    usage(() => parseEvaluator({ metric: 'bleu' }, parties, true), /^--metric: expected exact_match or log_likelihood/);
  });
});

describe('--eval-cmd', () => {
  it('quotes the model folder for the shell', () => {
    for (const path of ['/plain/dir', "/it's here/a b", '/$HOME/`x`/"q"/\\n']) {
      assert.equal(execFileSync('sh', ['-c', `printf %s ${shellQuote(path)}`], { encoding: 'utf8' }), path);
    }
  });

  it('takes the last line of the output as JSON scores, or says why not', () => {
    assert.deepEqual(parseScores('loading...\n|table|\n{"gsm": 0.5, "arith": 1}\n\n'), { gsm: 0.5, arith: 1 });
    const bad = (out: string, why: RegExp): void =>
      assert.throws(
        () => parseScores(out),
        (e: unknown) =>
          e instanceof Error &&
          e.message.startsWith("the last line of the evaluation command's output must be a JSON object") &&
          why.test(e.message),
        why.source,
      );
    bad('', /it printed nothing/);
    bad('{"a": 1}\ndone', /it is "done"/);
    bad('[1, 2]', /they are not an object \{ "task": number \}: "\[1, 2\]"$/);
    bad('{}', /they name no task: "\{\}"$/);
    bad('{"a": "high"}', /the score of "a" is "high", not a finite number/);
    bad('{"a": null}', /the score of "a" is null, not a finite number/);
  });
});

describe('--weights', () => {
  it('parses party=weight pairs into MergeOptions.weights', () => {
    assert.deepEqual(parseWeights('a=1,b=0.5', parties), { a: 1, b: 0.5 });
    assert.deepEqual(parseWeights(undefined, parties), {});
    usage(() => parseWeights('a=1,z=2', parties), /^--weights: "z" is not one of --parties/);
    usage(() => parseWeights('a', parties), /^--weights: expected party=weight, got "a"/);
    usage(() => parseWeights('a=1,a=2', parties), /^--weights: a is given twice/);
    usage(() => parseWeights('a=-1', parties), /^--weights: expected a number ≥ 0/);
    usage(() => parseWeights('a=', parties), /^--weights: expected a number ≥ 0/);
  });
});

describe('createJobRequest', () => {
  it('fills in defaults and builds the proto request', () => {
    const r = createJobRequest({ basePath: '/srv/base', parties, rate: 0.9 });
    assert.equal(r.method, 'dp');
    assert.deepEqual(r.dpa, { off: true, fixed: undefined, search: undefined, scaleOutsideByMax: false });
    assert.deepEqual(r.merge, { weights: {}, signElection: false, partiesMayDownload: false, output: 0 });
    const withAll = createJobRequest({
      basePath: '/b',
      parties,
      rate: 0.5,
      method: 'dare',
      dpa: parseDpa('fixed:1.2,1', parties),
      merge: { weights: parseWeights('a=2', parties), partiesMayDownload: true },
      label: 'x',
    });
    assert.deepEqual(withAll.merge?.weights, { a: 2 });
    assert.equal(withAll.label, 'x');
    assert.equal(r.maxAbsValue, 0, 'unset: the server applies its default');
    assert.equal(createJobRequest({ basePath: '/b', parties, rate: 0.5, maxAbsValue: 25 }).maxAbsValue, 25);
  });

  it('names the field that is wrong', () => {
    const bad: [Parameters<typeof createJobRequest>[0], RegExp][] = [
      [{ basePath: '', parties, rate: 0.9 }, /^basePath:/],
      [{ basePath: '/b', parties: [], rate: 0.9 }, /^parties: at least one/],
      [{ basePath: '/b', parties: ['a', 'a'], rate: 0.9 }, /^parties: "a" is given twice/],
      [{ basePath: '/b', parties, rate: 1 }, /^rate: must be in \[0, 1\)/],
      [{ basePath: '/b', parties, rate: 0.9, maxAbsValue: 0 }, /^maxAbsValue: must be a finite number > 0, got 0/],
      [
        { basePath: '/b', parties, rate: 0.9, maxAbsValue: Infinity },
        /^maxAbsValue: must be a finite number > 0, got Infinity/,
      ],
      [
        { basePath: '/b', parties, rate: 0.9, dpa: { off: true, search: {} } },
        /^dpa: set exactly one of off, fixed, search \(2 set\)/,
      ],
      [{ basePath: '/b', parties, rate: 0.9, dpa: { scaleOutsideByMax: true } }, /^dpa: set exactly one/],
      [{ basePath: '/b', parties, rate: 0.9, merge: { weights: { z: 1 } } }, /^merge\.weights: "z" is not a party/],
      [
        { basePath: '/b', parties, rate: 0.9, dpa: { search: { partyEvaluator: { z: 1 } } } },
        /^dpa\.search\.partyEvaluator: "z" is not a party/,
      ],
      [
        { basePath: '/b', parties, rate: 0.9, dpa: { search: { onnx: { partyTasks: { z: {} } } } } },
        /^dpa\.search\.onnx\.partyTasks: "z" is not a party/,
      ],
    ];
    for (const [o, message] of bad)
      assert.throws(
        () => createJobRequest(o),
        (e: unknown) => e instanceof RangeError && message.test(e.message),
        message.source,
      );
  });
});

describe('JSON views', () => {
  it('job states are lower-case words', () => {
    assert.deepEqual(
      [
        JobState.JOB_STATE_COLLECTING,
        JobState.JOB_STATE_DPA,
        JobState.JOB_STATE_MERGING,
        JobState.JOB_STATE_MERGED,
        JobState.JOB_STATE_FAILED,
      ].map(jobStateName),
      ['collecting', 'dpa', 'merging', 'merged', 'failed'],
    );
  });

  it('a job as dppa job status --json prints it', () => {
    const job = Job.fromPartial({
      id: 'j1',
      state: JobState.JOB_STATE_FAILED,
      rate: 0.9,
      method: 'dp',
      dpa: parseDpa('fixed:a=1.5,1;1,1', parties),
      merge: { weights: { a: 2 } },
      parties: [{ name: 'a', tensorsReceived: 3, tensorsExpected: 30, bytesReceived: 12345n }],
      evaluations: [{ party: 'a', seq: 1, denseReference: true, scores: { gsm8k: 0.5 }, domainRatio: 1 }],
      failureReason: 'party c timed out',
    });
    const j = jobJson(job);
    assert.equal(j.state, 'failed');
    assert.equal(j.failureReason, 'party c timed out');
    assert.deepEqual(j.dpa, { mode: 'fixed', factors: [1, 1], perParty: { a: [1.5, 1] }, scaleOutsideByMax: false });
    assert.deepEqual((j.parties as { bytesReceived: number }[])[0]!.bytesReceived, 12345);
    assert.deepEqual(j.evaluations, [
      { party: 'a', seq: 1, denseReference: true, factors: [], scores: { gsm8k: 0.5 }, domainRatio: 1 },
    ]);
    // Every value survives JSON (no bigint left).
    assert.doesNotThrow(() => JSON.stringify(j));
    assert.equal(jobJson(Job.fromPartial({ id: 'j2', state: JobState.JOB_STATE_MERGED })).failureReason, null);
  });

  it('an unset search method or tuner is shown with the default it stands for', () => {
    const dpaLine = (dpa: DpaConfig): string =>
      jobText(Job.fromPartial({ id: 'j3', dpa }))
        .split('\n')
        .find((l) => l.startsWith('  dpa'))!;
    assert.equal(
      dpaLine(DpaConfig.fromPartial(parseDpa('search', parties))),
      '  dpa         search (default (whole), default (greedy), evaluator default)',
    );
    assert.equal(
      dpaLine(DpaConfig.fromPartial(parseDpa('search:method=progressive,tuner=golden', parties))),
      '  dpa         search (progressive, golden, evaluator default)',
    );
    const j = jobJson(Job.fromPartial({ id: 'j3', dpa: parseDpa('search', parties) })).dpa as Record<string, unknown>;
    assert.deepEqual([j.method, j.tuner], ['default (whole)', 'default (greedy)']);
  });

  it('events as one JSON object and one line each', () => {
    const ev = {
      jobId: 'j1',
      seq: 7n,
      time: '2026-01-01T00:00:00Z',
      stateChanged: { from: JobState.JOB_STATE_COLLECTING, to: JobState.JOB_STATE_DPA },
    };
    assert.deepEqual(eventJson(ev), {
      jobId: 'j1',
      seq: 7,
      time: '2026-01-01T00:00:00Z',
      type: 'stateChanged',
      from: 'collecting',
      to: 'dpa',
    });
    assert.equal(eventText(ev), '2026-01-01T00:00:00Z #7 state collecting → dpa');
    const up = {
      jobId: 'j1',
      seq: 8n,
      time: '',
      uploadProgress: { party: 'a', tensorsReceived: 2, tensorsExpected: 30, bytesReceived: 2048n },
    };
    assert.deepEqual(eventJson(up), {
      jobId: 'j1',
      seq: 8,
      time: '',
      type: 'uploadProgress',
      party: 'a',
      tensorsReceived: 2,
      tensorsExpected: 30,
      bytesReceived: 2048,
    });
    assert.equal(eventText(up), '#8 upload a: 2/30 tensors, 2.0 kB');
    assert.deepEqual(
      eventJson({ jobId: 'j1', seq: 9n, time: '', failed: { reason: 'cancelled' } }).reason,
      'cancelled',
    );
  });
});
