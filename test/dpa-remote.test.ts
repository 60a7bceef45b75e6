/**
 * The DPA factor search with the remote (federated) evaluator, end to end on a
 * real server over gRPC: parties push with the SDK and serve the evaluation
 * requests with `DppaClient.evaluate` and a callback whose score is a known
 * unimodal function of the factors; the recorded evaluations, the chosen
 * factors and the merged checkpoint are checked. Then the protocol's rules,
 * and parties that drop their stream.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials, status, type ClientDuplexStream } from '@grpc/grpc-js';
import {
  DppaClient,
  EvaluationError,
  pruneToFile,
  type EvaluateFn,
  type EvaluationCandidate,
  type Job,
  type JobEvent,
} from '../client/index.js';
import {
  CandidateKind,
  EvaluationServiceClient,
  type EvaluationReply,
  type EvaluationRequest,
} from '../proto/gen/dppa/v1/evaluation.js';
import { JobState, SearchMethod } from '../proto/gen/dppa/v1/jobs.js';
import { CuttingProxy } from './fixtures/cutting-proxy.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, auth, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
let fts: string[];
let h: Harness;
let admin: DppaClient;
const RETRY = { attempts: 5, initialDelayMs: 20, maxDelayMs: 200 };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-dpa-remote-'));
  ({ base, finetuned: fts } = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 31, finetunes: 2 }));
  h = await startHarness(join(dir, 'data'), { mergeWorkers: 0 });
  admin = new DppaClient({ address: h.address, token: ADMIN, retry: RETRY });
});
after(async () => {
  admin.close();
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** Dense scores of the synthetic harness: not 1, so that the Domain-Ratio really divides. */
const DENSE = { a: 0.5, b: 2 };

/** Scores peaking at `opt`, one task per partition: task a follows f1, task b follows f2 (separable, unimodal). */
function syntheticScores(c: EvaluationCandidate, opt: readonly [number, number]): Record<string, number> {
  if (c.kind === 'dense') return { ...DENSE };
  const [f1, f2] = c.factors as [number, number];
  return { a: DENSE.a * Math.exp(-((f1 - opt[0]) ** 2)), b: DENSE.b * Math.exp(-((f2 - opt[1]) ** 2)) };
}

/** An evaluate callback with synthetic scores, recording every call; `hook` runs before it answers. */
function harness(
  opt: readonly [number, number],
  hook?: (call: number, c: EvaluationCandidate) => Promise<void> | void,
): { fn: EvaluateFn; calls: { dir: string; c: EvaluationCandidate }[] } {
  const calls: { dir: string; c: EvaluationCandidate }[] = [];
  return {
    calls,
    fn: async (modelDir, c) => {
      calls.push({ dir: modelDir, c });
      await hook?.(calls.length, c);
      return syntheticScores(c, opt);
    },
  };
}

/** The candidates of Method 1's greedy climb (step 0.1 from 1) for P = 2, as the released code tunes them. */
function methodOne(opt: readonly [number, number], upper: number): number[][] {
  const r = (x: number): number => Math.round(x * 10) / 10;
  const seq: number[][] = [];
  let f1 = 1;
  seq.push([f1, 0]);
  while (r(f1 + 0.1) <= upper && Math.abs(r(f1 + 0.1) - opt[0]) < Math.abs(f1 - opt[0]))
    seq.push([(f1 = r(f1 + 0.1)), 0]);
  if (r(f1 + 0.1) <= upper) seq.push([r(f1 + 0.1), 0]);
  let f2 = 1;
  seq.push([f1, f2]);
  while (r(f2 + 0.1) <= upper && Math.abs(r(f2 + 0.1) - opt[1]) < Math.abs(f2 - opt[1]))
    seq.push([f1, (f2 = r(f2 + 0.1))]);
  if (r(f2 + 0.1) <= upper) seq.push([f1, r(f2 + 0.1)]);
  return seq;
}

async function watchUntilEnd(jobId: string): Promise<JobEvent[]> {
  const events: JobEvent[] = [];
  for await (const e of admin.watchJob(jobId)) events.push(e);
  return events;
}

function party(token: string): DppaClient {
  return new DppaClient({ address: h.address, token, retry: RETRY });
}

async function metric(name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.split(' ')[1]);
}

describe('DPA search with the remote evaluator', () => {
  it('searches each party with its own evaluations, records them, and merges with the chosen factors', async () => {
    const opts = { math: [1.3, 1.1], law: [1.24, 1.57] } as const;
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: ['math', 'law'],
      rate: 0.8,
      dpa: { search: { method: SearchMethod.SEARCH_METHOD_PROGRESSIVE, upper: 3 } },
      merge: { weights: { math: 1, law: 0.5 } },
    });
    const deltas = { math: join(dir, 'math.dppa'), law: join(dir, 'law.dppa') };
    // law prunes to a file with the client and pushes it; math prunes while pushing and keeps the file.
    await pruneToFile({ base, finetuned: fts[1]!, rate: 0.8, out: deltas.law, workers: 1 });
    const watched = watchUntilEnd(job.id);
    const harnesses = { math: harness(opts.math), law: harness(opts.law) };
    const runs = (['math', 'law'] as const).map(async (name, i) => {
      const client = party(tokens[name]!);
      const serve = (): ReturnType<DppaClient['evaluate']> =>
        client.evaluate({
          jobId: job.id,
          party: name,
          base,
          finetuned: fts[i]!,
          delta: deltas[name],
          workDir: join(dir, `work-${name}`),
          evaluate: harnesses[name].fn,
        });
      try {
        if (name === 'math') {
          await client.push({
            jobId: job.id,
            party: name,
            base,
            finetuned: fts[0]!,
            keepDelta: deltas.math,
            workers: 1,
          });
          return await serve();
        }
        // Connected while the job still collects: it waits for requests.
        const serving = serve();
        await client.push({ jobId: job.id, party: name, delta: deltas.law });
        return await serving;
      } finally {
        client.close();
      }
    });
    const results = await Promise.all(runs);
    assert.deepEqual(results, [
      { evaluated: methodOne(opts.math, 3).length + 1, answered: methodOne(opts.math, 3).length + 1 },
      { evaluated: methodOne(opts.law, 3).length + 1, answered: methodOne(opts.law, 3).length + 1 },
    ]);
    const events = await watched;
    const done = await admin.getJob(job.id);
    assert.equal(done.state, JobState.JOB_STATE_MERGED, done.failureReason);

    for (const name of ['math', 'law'] as const) {
      const expected = methodOne(opts[name], 3);
      const mine = done.evaluations.filter((e) => e.party === name);
      assert.deepEqual(
        mine.map((e) => e.seq),
        mine.map((_e, i) => i + 1),
        `${name}: seq counts from 1`,
      );
      assert.deepEqual(mine[0], {
        party: name,
        seq: 1,
        denseReference: true,
        factors: [],
        scores: DENSE,
        domainRatio: 1,
      });
      assert.deepEqual(
        mine.slice(1).map((e) => e.factors),
        expected,
        `${name}: Method 1's sequence`,
      );
      for (const e of mine.slice(1)) {
        const scores = syntheticScores({ kind: 'amplified', factors: e.factors }, opts[name]);
        assert.deepEqual(e.scores, scores);
        assert.ok(Math.abs(e.domainRatio - Math.sqrt((scores.a! / DENSE.a) * (scores.b! / DENSE.b))) < 1e-12);
      }
      // Every candidate was built and scored once: the dense model as it is, the others in the work folder.
      const calls = harnesses[name].calls;
      assert.deepEqual(
        calls.map((c) => c.c.factors),
        [[], ...expected],
      );
      assert.equal(calls[0]!.dir, fts[name === 'math' ? 0 : 1]);
      assert.ok(calls.slice(1).every((c) => c.dir === join(dir, `work-${name}`, 'candidate')));
      assert.ok(
        existsSync(join(dir, `work-${name}`, 'candidate', 'config.json')),
        'the candidate is a whole checkpoint folder',
      );
      const status = done.parties.find((p) => p.name === name)!;
      assert.equal(status.factorsFinal, true);
      status.factors.forEach((f, p) =>
        assert.ok(Math.abs(f - opts[name][p]!) <= 0.1 + 1e-9, `${name} f${p + 1} = ${f}`),
      );
      const chosen = events.find((e) => e.factorsChosen?.party === name)?.factorsChosen;
      assert.deepEqual(chosen?.factors, status.factors);
      assert.equal(
        chosen?.domainRatio,
        Math.max(
          ...mine
            .slice(1)
            .filter((e) => e.factors.every((f, p) => f === status.factors[p]))
            .map((e) => e.domainRatio),
        ),
      );
    }
    assert.deepEqual(done.parties.find((p) => p.name === 'math')!.factors, [1.3, 1.1]);
    assert.deepEqual(done.parties.find((p) => p.name === 'law')!.factors, [1.2, 1.6]);

    const transitions = events.flatMap((e) =>
      e.stateChanged === undefined ? [] : [[e.stateChanged.from, e.stateChanged.to]],
    );
    assert.deepEqual(transitions, [
      [JobState.JOB_STATE_COLLECTING, JobState.JOB_STATE_DPA],
      [JobState.JOB_STATE_DPA, JobState.JOB_STATE_MERGING],
      [JobState.JOB_STATE_MERGING, JobState.JOB_STATE_MERGED],
    ]);
    const announced = events.flatMap((e) =>
      e.evaluationDone?.evaluation === undefined ? [] : [e.evaluationDone.evaluation],
    );
    assert.deepEqual(announced, done.evaluations, 'each evaluation was announced as recorded');
    assert.equal(await metric('dppa_dpa_evaluations_total{evaluator="remote"}'), done.evaluations.length);
    assert.equal(await metric('dppa_dpa_evaluation_seconds_count{evaluator="remote"}'), done.evaluations.length);
    assert.equal(h.server.evaluators.streamCount, 0, 'every evaluation stream ended');

    await assertMerged(base, join(dir, 'data', 'jobs', job.id, 'merged'), [
      { delta: deltas.math, weight: 1, factors: done.parties[0]!.factors },
      { delta: deltas.law, weight: 0.5, factors: done.parties[1]!.factors },
    ]);
  });
});

/** A raw Evaluate stream, for the protocol's rules. */
class RawStream {
  readonly requests: EvaluationRequest[] = [];
  readonly ended: Promise<{ code: number; details: string }>;
  private readonly call: ClientDuplexStream<EvaluationReply, EvaluationRequest>;
  private wake: (() => void) | undefined;

  constructor(client: EvaluationServiceClient, token: string) {
    this.call = client.evaluate(auth(token));
    this.call.on('data', (r: EvaluationRequest) => {
      this.requests.push(r);
      this.wake?.();
    });
    this.ended = new Promise((resolve) => {
      this.call.on('error', (e: { code: number; details: string }) => resolve({ code: e.code, details: e.details }));
      this.call.on(
        'status',
        (s: { code: status; details: string }) => s.code === status.OK && resolve({ code: s.code, details: s.details }),
      );
    });
  }

  send(m: EvaluationReply): void {
    this.call.write(m);
  }

  async request(n: number): Promise<EvaluationRequest> {
    while (this.requests.length < n) await new Promise<void>((r) => (this.wake = r));
    return this.requests[n - 1]!;
  }

  cancel(): void {
    this.call.cancel();
  }
}

describe('EvaluationService rules', () => {
  let evaluations: EvaluationServiceClient;
  let delta: string;
  before(async () => {
    evaluations = new EvaluationServiceClient(h.address, credentials.createInsecure());
    delta = join(dir, 'solo.dppa');
    await pruneToFile({ base, finetuned: fts[0]!, rate: 0.8, out: delta, workers: 1 });
  });
  after(() => evaluations.close());

  async function searchJob(name: string, partyTimeoutSeconds: number): Promise<{ job: Job; token: string }> {
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: [name],
      rate: 0.8,
      dpa: { search: { method: SearchMethod.SEARCH_METHOD_PROGRESSIVE, upper: 3, partyTimeoutSeconds } },
    });
    return { job, token: tokens[name]! };
  }

  async function upload(jobId: string, name: string, token: string): Promise<void> {
    const client = party(token);
    try {
      await client.push({ jobId, party: name, delta });
    } finally {
      client.close();
    }
  }

  async function until(what: string, test: () => boolean): Promise<void> {
    for (let i = 0; i < 300 && !test(); i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(test(), `timed out waiting until ${what}`);
  }

  it("checks the caller, the hello, request ids and scores; a result with an error stops the party's search until it rejoins", async () => {
    const { job, token } = await searchJob('solo', 30);
    const hello = { hello: { jobId: job.id, party: 'solo' } };
    const wrong = new RawStream(evaluations, token);
    wrong.send({ hello: { jobId: job.id, party: 'someone' } });
    assert.equal((await wrong.ended).code, status.PERMISSION_DENIED);
    const early = new RawStream(evaluations, token);
    early.send({ result: { requestId: 'x', scores: { t: 1 }, error: '' } });
    assert.match((await early.ended).details, /first message .* must be an EvaluationHello/);

    const a = new RawStream(evaluations, token);
    a.send(hello);
    await until('the stream is connected', () => h.server.evaluators.streamCount === 1);
    const b = new RawStream(evaluations, token);
    b.send(hello);
    assert.equal((await b.ended).code, status.ALREADY_EXISTS);

    await upload(job.id, 'solo', token);
    const dense = await a.request(1);
    assert.deepEqual(
      { ...dense, requestId: '' },
      { requestId: '', kind: CandidateKind.CANDIDATE_KIND_DENSE_FINETUNED, factors: [], outsideFactor: 1 },
    );
    a.send({ result: { requestId: 'nope', scores: { t: 1 }, error: '' } });
    const bad = await a.ended;
    assert.equal(bad.code, status.INVALID_ARGUMENT);
    assert.match(bad.details, /"nope", which is not outstanding/);

    // The unanswered request is sent again, as it was, on the next stream.
    const c = new RawStream(evaluations, token);
    c.send(hello);
    assert.equal((await c.request(1)).requestId, dense.requestId);
    c.send({ result: { requestId: dense.requestId, scores: { t: NaN }, error: '' } });
    assert.match((await c.ended).details, /^scores: the score of "t" is NaN, not a finite number$/);

    const d = new RawStream(evaluations, token);
    d.send(hello);
    d.send({ result: { requestId: (await d.request(1)).requestId, scores: { t: 0.5 }, error: '' } });
    const first = await d.request(2);
    assert.deepEqual(
      { ...first, requestId: '' },
      { requestId: '', kind: CandidateKind.CANDIDATE_KIND_AMPLIFIED, factors: [1, 0], outsideFactor: 1 },
    );
    d.send({ result: { requestId: first.requestId, scores: { u: 0.5 }, error: '' } });
    assert.match((await d.ended).details, /tasks \["u"\] differ from those of the dense reference, \["t"\]/);

    const e = new RawStream(evaluations, token);
    e.send(hello);
    const crashed = await e.request(1);
    e.send({ result: { requestId: crashed.requestId, scores: {}, error: 'the harness crashed' } });
    const end = await e.ended;
    assert.equal(end.code, status.FAILED_PRECONDITION);
    const stopped = await admin.getJob(job.id);
    assert.equal(stopped.state, JobState.JOB_STATE_DPA, 'the job waits for the party');
    const reason =
      'its evaluation failed: the harness crashed; its search stopped: run dppa evaluate again to resume it';
    assert.equal(stopped.parties[0]!.stoppedReason, reason);
    assert.equal(end.details, `the search of party solo of job ${job.id} stopped: ${reason}`);
    assert.deepEqual(
      stopped.evaluations.map((x) => x.scores),
      [{ t: 0.5 }],
      'only the accepted result was recorded',
    );
    assert.equal(h.server.evaluators.streamCount, 0);

    // The party rejoins: its search resumes from what was recorded, asking for the same candidate again.
    const late = new RawStream(evaluations, token);
    late.send(hello);
    const again = await late.request(1);
    assert.deepEqual({ ...again, requestId: '' }, { ...crashed, requestId: '' });
    assert.equal((await admin.getJob(job.id)).parties[0]!.stoppedReason, '', 'cleared on rejoining');
    late.cancel();
    const { job: off, tokens } = await admin.createJob({ basePath: base, parties: ['x'], rate: 0.8 });
    const none = new RawStream(evaluations, tokens.x!);
    none.send({ hello: { jobId: off.id, party: 'x' } });
    assert.match((await none.ended).details, /does not search its factors/);
  });

  it('a party that drops its connection or leaves and comes back: the search resumes, no evaluation is repeated', async () => {
    const opt = [1.47, 1.2] as const;
    const expected = methodOne(opt, 3);
    const { job, token } = await searchJob('p', 30);
    await upload(job.id, 'p', token);
    const proxy = await CuttingProxy.start(h.address, Infinity, 'up');
    const leave = new AbortController();
    // Call 4: the network drops before the answer is sent. Call 6: the party leaves (its process stops).
    const first = harness(opt, (n) => {
      if (n === 4) proxy.cutNow();
      if (n === 6) leave.abort();
    });
    const client = new DppaClient({ address: proxy.address, token, retry: RETRY });
    const options = {
      jobId: job.id,
      party: 'p',
      base,
      finetuned: fts[0]!,
      delta,
      workDir: join(dir, 'work-p'),
      evaluate: first.fn,
    };
    try {
      await assert.rejects(client.evaluate(options, { signal: leave.signal }), { name: 'AbortError' });
      const second = harness(opt);
      const result = await client.evaluate({ ...options, evaluate: second.fn });
      assert.ok(proxy.cuts >= 1);
      // The answer lost with the connection was sent again, not computed again; the party that left redid its candidate.
      assert.deepEqual(
        first.calls.map((c) => c.c.factors),
        [[], ...expected.slice(0, 5)],
      );
      assert.deepEqual(
        second.calls.map((c) => c.c.factors),
        expected.slice(4),
      );
      assert.equal(result.evaluated, expected.length - 4);
      // The party's search ends before the job moves on (and a state is shown once written): wait for its end.
      const events = await watchUntilEnd(job.id);
      assert.ok(events.at(-1)?.merged !== undefined, 'the job merged');
      const done = await admin.getJob(job.id);
      assert.equal(done.state, JobState.JOB_STATE_MERGED, done.failureReason);
      assert.deepEqual(
        done.evaluations.map((e) => e.factors),
        [[], ...expected],
        'each candidate recorded once, in order',
      );
      assert.deepEqual(done.parties[0]!.factors, [1.5, 1.2]);
    } finally {
      client.close();
      await proxy.close();
    }
  });

  it('a party that does not come back within party_timeout_seconds fails the job', async () => {
    const { job, token } = await searchJob('gone', 1);
    await upload(job.id, 'gone', token);
    const leave = new AbortController();
    const client = party(token);
    const started = Date.now();
    try {
      const h1 = harness([1, 1], (n) => (n === 2 ? leave.abort() : undefined));
      await assert.rejects(
        client.evaluate(
          {
            jobId: job.id,
            party: 'gone',
            base,
            finetuned: fts[0]!,
            delta,
            workDir: join(dir, 'work-gone'),
            evaluate: h1.fn,
          },
          { signal: leave.signal },
        ),
        { name: 'AbortError' },
      );
      const events = await watchUntilEnd(job.id);
      assert.match(events.at(-1)?.failed?.reason ?? '', /^DPA search failed: party gone did not reconnect within 1 s/);
      assert.ok(Date.now() - started >= 1000);
      assert.equal((await admin.getJob(job.id)).evaluations.length, 1, 'the dense reference only');
    } finally {
      client.close();
    }
    // A party that never connects at all.
    const never = await searchJob('never', 1);
    await upload(never.job.id, 'never', never.token);
    const events = await watchUntilEnd(never.job.id);
    assert.match(events.at(-1)?.failed?.reason ?? '', /^DPA search failed: party never did not connect within 1 s/);
  });

  it("a callback that keeps failing is retried, then stops its party's search only; the party resumes it and the job merges", async () => {
    const opts = { math: [1.3, 1.1], oops: [1.24, 1.57] } as const;
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: ['math', 'oops'],
      rate: 0.8,
      dpa: { search: { method: SearchMethod.SEARCH_METHOD_PROGRESSIVE, upper: 3, partyTimeoutSeconds: 30 } },
    });
    const deltas = { math: join(dir, 'both-math.dppa'), oops: join(dir, 'both-oops.dppa') };
    await pruneToFile({ base, finetuned: fts[1]!, rate: 0.8, out: deltas.oops, workers: 1 });
    const clients = { math: party(tokens.math!), oops: party(tokens.oops!) };
    const options = (name: 'math' | 'oops', evaluate: EvaluateFn): Parameters<DppaClient['evaluate']>[0] => ({
      jobId: job.id,
      party: name,
      base,
      finetuned: fts[name === 'math' ? 0 : 1]!,
      delta: deltas[name],
      workDir: join(dir, `work-both-${name}`),
      evaluate,
    });
    try {
      // oops: the first attempt at its second candidate fails (retried: no harm done), every attempt at its fourth.
      let flaky = 0;
      const broken = harness(opts.oops, (n, c) => {
        if (c.factors.join() === '1.1,0' && ++flaky === 1) throw new Error('CUDA error: out of memory');
        if (c.factors.join() === '1.2,0') throw new Error('the harness crashed');
      });
      const progress: string[] = [];
      const math = harness(opts.math);
      const mathDone = clients.math
        .push({ jobId: job.id, party: 'math', base, finetuned: fts[0]!, keepDelta: deltas.math, workers: 1 })
        .then(() => clients.math.evaluate(options('math', math.fn)));
      await clients.oops.push({ jobId: job.id, party: 'oops', delta: deltas.oops });
      const err = await clients.oops
        .evaluate(options('oops', broken.fn), {
          onProgress: (e) => e.type === 'retrying' && progress.push(`${e.attempt} ${(e.error as Error).message}`),
        })
        .catch((e: unknown) => e);
      assert.ok(err instanceof EvaluationError, String(err));
      assert.equal(err.message, 'evaluating factors [1.2, 0] failed: the harness crashed (attempt 3 of 3)');
      assert.deepEqual(progress, [
        '2 evaluating factors [1.1, 0] failed: CUDA error: out of memory',
        '2 evaluating factors [1.2, 0] failed: the harness crashed',
        '3 evaluating factors [1.2, 0] failed: the harness crashed',
      ]);
      assert.deepEqual(
        broken.calls.map((c) => c.c.factors),
        [[], [1, 0], [1.1, 0], [1.1, 0], [1.2, 0], [1.2, 0], [1.2, 0]],
      );
      // math's search goes on and chooses; the job waits in DPA for oops.
      await mathDone;
      const waiting = await admin.getJob(job.id);
      assert.equal(waiting.state, JobState.JOB_STATE_DPA);
      const [m, o] = waiting.parties;
      assert.equal(m!.factorsFinal, true);
      assert.equal(m!.stoppedReason, '');
      assert.equal(o!.factorsFinal, false);
      assert.equal(
        o!.stoppedReason,
        `its evaluation failed: ${err.message}; its search stopped: run dppa evaluate again to resume it`,
      );
      assert.deepEqual(
        waiting.evaluations.filter((e) => e.party === 'oops').map((e) => e.factors),
        [[], [1, 0], [1.1, 0]],
        "oops's results are kept",
      );

      // oops fixes its harness and rejoins: its search resumes where it stopped, nothing is evaluated twice.
      const fixed = harness(opts.oops);
      const watched = watchUntilEnd(job.id);
      const result = await clients.oops.evaluate(options('oops', fixed.fn));
      const expected = methodOne(opts.oops, 3);
      assert.deepEqual(
        fixed.calls.map((c) => c.c.factors),
        expected.slice(2),
      );
      assert.equal(result.evaluated, expected.length - 2);
      const events = await watched;
      assert.ok(events.at(-1)?.merged !== undefined, 'the job merged');
      const stops = events.filter((e) => e.partyStopped !== undefined).map((e) => e.partyStopped!);
      assert.deepEqual(stops, [{ party: 'oops', reason: o!.stoppedReason, discardedTensors: [] }]);
      const done = await admin.getJob(job.id);
      assert.deepEqual(
        done.parties.map((p) => p.stoppedReason),
        ['', ''],
      );
      assert.deepEqual(
        done.evaluations.filter((e) => e.party === 'oops').map((e) => e.factors),
        [[], ...expected],
      );
      await assertMerged(base, join(dir, 'data', 'jobs', job.id, 'merged'), [
        { delta: deltas.math, weight: 1, factors: done.parties[0]!.factors },
        { delta: deltas.oops, weight: 1, factors: done.parties[1]!.factors },
      ]);
    } finally {
      clients.math.close();
      clients.oops.close();
    }
  });
});
