/**
 * A server restarted in the middle of a DPA search: the search resumes from
 * the evaluations recorded in job.json, none is asked for again, and the
 * party's evaluation in progress during the restart answers the repeated
 * request from its kept result.
 */
import assert from 'node:assert/strict';
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  DppaClient,
  JobState,
  pruneToFile,
  SearchMethod,
  type EvaluateFn,
  type EvaluationCandidate,
} from '../client/index.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { freePort } from './fixtures/free-port.js';

let dir: string;
let data: string;
let base: string;
let finetuned: string;
let delta: string;
let port: number;
let h: Harness | undefined;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-dpa-restart-'));
  data = join(dir, 'data');
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 12 });
  base = fam.base;
  finetuned = fam.finetuned[0]!;
  delta = join(dir, 'p.dppa');
  await pruneToFile({ base, finetuned, rate: 0.8, out: delta, workers: 1 });
  port = await freePort();
});
after(async () => {
  await h?.close();
  await rm(dir, { recursive: true, force: true });
});

/** Unimodal in each factor with its top at (1.3, 1.2). */
function score(c: EvaluationCandidate): Record<string, number> {
  if (c.kind === 'dense') return { t: 1 };
  return { t: Math.exp(-((c.factors[0]! - 1.3) ** 2) - (c.factors[1]! - 1.2) ** 2) };
}

/** Method 1's candidates (the job sets `method: SEARCH_METHOD_PROGRESSIVE`) towards the top (1.3, 1.2). */
const EXPECTED = [
  [1, 0],
  [1.1, 0],
  [1.2, 0],
  [1.3, 0],
  [1.4, 0],
  [1.3, 1],
  [1.3, 1.1],
  [1.3, 1.2],
  [1.3, 1.3],
];

describe('DPA search across a server restart', () => {
  it('resumes from the recorded evaluations without repeating one', async () => {
    h = await startHarness(data, { grpcPort: port, shutdownGraceMs: 300, mergeWorkers: 0 });
    const address = `127.0.0.1:${port}`;
    const admin = new DppaClient({
      address,
      token: ADMIN,
      retry: { attempts: 10, initialDelayMs: 50, maxDelayMs: 300 },
    });
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: ['p'],
      rate: 0.8,
      dpa: { search: { method: SearchMethod.SEARCH_METHOD_PROGRESSIVE, upper: 3, partyTimeoutSeconds: 60 } },
    });
    const party = new DppaClient({
      address,
      token: tokens.p!,
      retry: { attempts: 5, initialDelayMs: 50, maxDelayMs: 300 },
    });
    let stopRequested!: () => void;
    const stopNow = new Promise<void>((r) => (stopRequested = r));
    let restart!: () => void;
    const restarted = new Promise<void>((r) => (restart = r));
    const calls: number[][] = [];
    // The fourth candidate is being evaluated while the server stops and starts again.
    const evaluate: EvaluateFn = async (_dir, c) => {
      calls.push(c.factors);
      if (calls.length === 4) {
        stopRequested();
        await restarted;
      }
      return score(c);
    };
    try {
      await party.push({ jobId: job.id, party: 'p', delta });
      const evaluating = party.evaluate({
        jobId: job.id,
        party: 'p',
        base,
        finetuned,
        delta,
        workDir: join(dir, 'work'),
        evaluate,
      });
      await stopNow;
      await h.close();
      h = undefined;
      const stored = JSON.parse(await readFile(join(data, 'jobs', job.id, 'job.json'), 'utf8')) as {
        state: string;
        evaluations: { factors?: number[] }[];
      };
      assert.equal(stored.state, 'JOB_STATE_DPA', 'a stopped search leaves its job in DPA');
      assert.deepEqual(
        stored.evaluations.map((e) => e.factors ?? []),
        [[], ...EXPECTED.slice(0, 2)],
        'what was answered is on disk',
      );

      h = await startHarness(data, { grpcPort: port, shutdownGraceMs: 300, mergeWorkers: 0 });
      restart();
      const result = await evaluating;
      assert.equal(result.evaluated, EXPECTED.length + 1);
      assert.deepEqual(calls, [[], ...EXPECTED], 'the party scored every candidate once');

      for await (const e of admin.watchJob(job.id)) if (e.failed !== undefined) assert.fail(e.failed.reason);
      const done = await admin.getJob(job.id);
      assert.equal(done.state, JobState.JOB_STATE_MERGED);
      assert.deepEqual(
        done.evaluations.map((e) => [e.seq, e.factors]),
        [[], ...EXPECTED].map((f, i) => [i + 1, f]),
        'recorded once each, in order',
      );
      assert.deepEqual(done.parties[0]!.factors, [1.3, 1.2]);
      const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
      assert.match(
        text,
        new RegExp(`^dppa_dpa_evaluations_total\\{evaluator="remote"\\} ${EXPECTED.length + 1 - 3}$`, 'm'),
        'the restarted server evaluated only the rest',
      );
      await assertMerged(base, join(data, 'jobs', job.id, 'merged'), [{ delta, weight: 1, factors: [1.3, 1.2] }]);
    } finally {
      party.close();
      admin.close();
    }
  });
});
