/**
 * The federated DPA search from the command line, as parties run it: `dppa job
 * create --dpa search`, `dppa push --eval-cmd` and `dppa evaluate` as separate
 * processes against a real server, with docs/examples/eval-harness.ts as the
 * evaluation command (over a stand-in for lm_eval that scores the weights), so
 * that each score depends on the candidate's factors through its weights.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { applyDelta, DppaClient, pruneToFile } from '../client/index.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { CHILD_LIMITS } from './fixtures/child-limits.js';

const root = new URL('..', import.meta.url).pathname;
const main = join(root, 'client/cli/main.ts');

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI with a clean environment plus `env`. */
function dppa(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('DPPA_') && !k.startsWith('LM_EVAL_')),
  );
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', main, ...args],
      { cwd: root, env: { ...clean, ...env }, maxBuffer: 16 * 1024 * 1024, ...CHILD_LIMITS },
      (err, stdout, stderr) => {
        resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
      },
    );
  });
}

let dir: string;
let base: string;
let fts: string[];
let h: Harness;
/** Where each party's `near` task peaks: the checkpoint with these factors applied. */
const TARGETS = { math: [1.2, 1.1], law: [1.1, 1.3] };
const targets: Record<string, string> = {};
const lawDelta = (): string => join(dir, 'law.dppa');

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-dpa-cli-'));
  ({ base, finetuned: fts } = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 44, finetunes: 2 }));
  // The same deltas the parties' CLI will prune (pruning is deterministic), amplified to the targets.
  for (const [i, party] of (['math', 'law'] as const).entries()) {
    const delta = party === 'law' ? lawDelta() : join(dir, 'math-reference.dppa');
    await pruneToFile({ base, finetuned: fts[i]!, rate: 0.8, out: delta, workers: 1 });
    targets[party] = join(dir, `target-${party}`);
    await applyDelta({ base, delta, out: targets[party], factors: TARGETS[party] });
  }
  h = await startHarness(join(dir, 'data'), { mergeWorkers: 0 });
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

const EVAL_CMD = `node --import tsx ${join(root, 'docs/examples/eval-harness.ts')} {model}`;
function harnessEnv(party: string): Record<string, string> {
  return {
    LM_EVAL_TASKS: 'near,steady',
    LM_EVAL_CMD: `${process.execPath} --import tsx ${join(root, 'test/fixtures/fake-lm-eval.ts')}`,
    FAKE_LM_EVAL_TARGET: targets[party]!,
  };
}

describe('dppa push --eval-cmd and dppa evaluate', () => {
  it('serve the search with a shell command; job status shows the evaluations; the merge uses the chosen factors', async () => {
    const created = await dppa(
      [
        'job',
        'create',
        '--server',
        h.address,
        '--base',
        base,
        '--parties',
        'math,law',
        '--rate',
        '0.8',
        '--dpa',
        'search:upper=2,party-timeout=20',
        '--evaluator',
        'remote',
        '--json',
      ],
      { DPPA_ADMIN_TOKEN: ADMIN },
    );
    assert.equal(created.code, 0, created.stderr);
    const { jobId, tokens } = JSON.parse(created.stdout) as { jobId: string; tokens: Record<string, string> };
    const common = ['--server', h.address, '--job', jobId];
    const math = dppa(
      [
        'push',
        ...common,
        '--party',
        'math',
        '--token',
        tokens.math!,
        '--base',
        base,
        '--finetuned',
        fts[0]!,
        '--workers',
        '1',
        '--eval-cmd',
        EVAL_CMD,
        '--work-dir',
        join(dir, 'work-math'),
      ],
      harnessEnv('math'),
    );
    // law pushes a file without evaluating, then joins the search with dppa evaluate.
    const law = (async (): Promise<Run> => {
      const pushed = await dppa(['push', ...common, '--party', 'law', '--token', tokens.law!, '--delta', lawDelta()]);
      assert.equal(pushed.code, 0, pushed.stderr);
      return dppa(
        [
          'evaluate',
          ...common,
          '--party',
          'law',
          '--token',
          tokens.law!,
          '--base',
          base,
          '--finetuned',
          fts[1]!,
          '--delta',
          lawDelta(),
          '--eval-cmd',
          EVAL_CMD,
          '--work-dir',
          join(dir, 'work-law'),
          '--json',
        ],
        harnessEnv('law'),
      );
    })();
    const [m, l] = await Promise.all([math, law]);
    assert.equal(m.code, 0, m.stderr);
    assert.equal(l.code, 0, l.stderr);
    assert.match(m.stdout, /upload to job .* complete/);
    assert.match(m.stdout, /^evaluating factors 1\.2, 1\.1$/m);
    assert.match(m.stdout, /search over \(7 candidate\(s\) evaluated/);
    assert.deepEqual(JSON.parse(l.stdout.trim().split('\n').at(-1)!), { evaluated: 8, answered: 8 });

    const status = await dppa(['job', 'status', '--server', h.address, '--job', jobId, '--json'], {
      DPPA_ADMIN_TOKEN: ADMIN,
    });
    assert.equal(status.code, 0, status.stderr);
    const job = JSON.parse(status.stdout) as {
      state: string;
      failureReason: string | null;
      parties: { name: string; factors: number[]; factorsFinal: boolean }[];
      evaluations: {
        party: string;
        seq: number;
        denseReference: boolean;
        factors: number[];
        scores: Record<string, number>;
        domainRatio: number;
      }[];
    };
    assert.equal(job.failureReason, null);
    const expected = {
      // The default search, Method 2: every partition at 1 from the start, f1 then f2 climbed in steps of 0.1 until
      // the score drops ([1.2, 1] ends f1's climb and starts f2's, so it is scored once).
      math: [
        [1, 1],
        [1.1, 1],
        [1.2, 1],
        [1.3, 1],
        [1.2, 1.1],
        [1.2, 1.2],
      ],
      law: [
        [1, 1],
        [1.1, 1],
        [1.2, 1],
        [1.1, 1.1],
        [1.1, 1.2],
        [1.1, 1.3],
        [1.1, 1.4],
      ],
    };
    for (const party of ['math', 'law'] as const) {
      const mine = job.evaluations.filter((e) => e.party === party);
      assert.deepEqual(
        mine.map((e) => e.factors),
        [[], ...expected[party]],
        party,
      );
      assert.ok(mine.every((e) => Object.keys(e.scores).sort().join() === 'near,steady'));
      const best = mine.find((e) => e.factors.join() === TARGETS[party].join())!;
      assert.equal(best.scores.near, 1, `${party}: the target's own weights score 1`);
      assert.deepEqual(
        job.parties.find((p) => p.name === party),
        { ...job.parties.find((p) => p.name === party), factors: TARGETS[party], factorsFinal: true },
      );
    }
    const text = await dppa(['job', 'status', '--server', h.address, '--job', jobId], { DPPA_ADMIN_TOKEN: ADMIN });
    assert.match(text.stdout, /^ {2}evaluations 15$/m);
    assert.match(text.stdout, /^ {4}party +# +candidate +domain ratio +scores$/m);
    assert.match(text.stdout, /^ {4}math +1 +dense reference +100\.00% +near=\S+ steady=0\.5$/m);
    assert.match(text.stdout, /^ {4}law +7 +1\.1, 1\.3 +\d+\.\d\d% +near=1 steady=0\.5$/m);

    const admin = new DppaClient({ address: h.address, token: ADMIN });
    try {
      for await (const e of admin.watchJob(jobId)) if (e.failed !== undefined) assert.fail(e.failed.reason);
    } finally {
      admin.close();
    }
    await assertMerged(base, join(dir, 'data', 'jobs', jobId, 'merged'), [
      { delta: join(dir, 'work-math', 'delta.dppa'), weight: 1, factors: TARGETS.math },
      { delta: lawDelta(), weight: 1, factors: TARGETS.law },
    ]);
  });

  it('an evaluation command that keeps failing is retried, exits 5 quoting its last stderr lines, and stops only its party; dppa evaluate resumes it', async () => {
    const created = await dppa(
      [
        'job',
        'create',
        '--server',
        h.address,
        '--base',
        base,
        '--parties',
        'solo',
        '--rate',
        '0.8',
        '--dpa',
        'search:upper=2',
        '--json',
      ],
      { DPPA_ADMIN_TOKEN: ADMIN },
    );
    const { jobId, tokens } = JSON.parse(created.stdout) as { jobId: string; tokens: Record<string, string> };
    const common = ['--server', h.address, '--job', jobId, '--party', 'solo', '--token', tokens.solo!];
    const runs = join(dir, 'solo-runs.txt');
    const failing = `: {model}; echo run >> ${runs}; for i in 1 2 3 4 5 6 7; do echo "trace line $i" >&2; done; exit 3`;
    const run = await dppa([
      'push',
      ...common,
      '--delta',
      lawDelta(),
      '--base',
      base,
      '--finetuned',
      fts[1]!,
      '--eval-cmd',
      failing,
      '--eval-retries',
      '1',
      '--work-dir',
      join(dir, 'work-solo'),
    ]);
    assert.equal(run.code, 5, run.stderr);
    const why = `evaluating the dense fine-tuned model failed: the evaluation command exited with code 3: ${failing.replace('{model}', `'${fts[1]!}'`)}; its last stderr lines: "trace line 3" "trace line 4" "trace line 5" "trace line 6" "trace line 7" (attempt 2 of 2)`;
    assert.ok(run.stderr.includes(`dppa push: ${why} (this party's search stopped`), run.stderr);
    assert.match(run.stderr, /; attempt 2 of 2$/m, 'the retry is announced');
    assert.equal(
      (await readFile(runs, 'utf8')).split('\n').filter(Boolean).length,
      2,
      'run once, then once more (--eval-retries 1)',
    );
    const status = await dppa(['job', 'status', '--server', h.address, '--job', jobId, '--json'], {
      DPPA_ADMIN_TOKEN: ADMIN,
    });
    const job = JSON.parse(status.stdout) as {
      state: string;
      failureReason: string | null;
      parties: { stoppedReason: string | null }[];
    };
    assert.equal(job.state, 'dpa', 'the job is kept');
    assert.equal(job.failureReason, null);
    const reason = `its evaluation failed: ${why}; its search stopped: run dppa evaluate again to resume it`;
    assert.equal(job.parties[0]!.stoppedReason, reason);
    const text = await dppa(['job', 'status', '--server', h.address, '--job', jobId], { DPPA_ADMIN_TOKEN: ADMIN });
    assert.ok(
      text.stdout.includes(`\n    solo  30/30 tensors`) &&
        text.stdout.includes(`complete\n          stopped: ${reason}`),
      text.stdout,
    );

    // The party fixes its command and rejoins: the search runs to its end and the job merges.
    const again = await dppa(
      [
        'evaluate',
        ...common,
        '--base',
        base,
        '--finetuned',
        fts[1]!,
        '--delta',
        lawDelta(),
        '--eval-cmd',
        EVAL_CMD,
        '--work-dir',
        join(dir, 'work-solo'),
        '--json',
      ],
      harnessEnv('law'),
    );
    assert.equal(again.code, 0, again.stderr);
    const admin = new DppaClient({ address: h.address, token: ADMIN });
    try {
      for await (const e of admin.watchJob(jobId)) if (e.failed !== undefined) assert.fail(e.failed.reason);
      const done = await admin.getJob(jobId);
      assert.equal(done.parties[0]!.stoppedReason, '');
      await assertMerged(base, join(dir, 'data', 'jobs', jobId, 'merged'), [
        { delta: lawDelta(), weight: 1, factors: done.parties[0]!.factors },
      ]);
    } finally {
      admin.close();
    }
  });
});
