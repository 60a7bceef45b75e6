// The DPA factor search on a cluster: two `dppa serve --cluster` replicas and a real nats-server; three parties whose
// candidates the server scores with its ONNX evaluator. Each replica runs one party's search at a time, so the searches
// spread over both; every evaluation is recorded once; the job merges with the chosen factors, exactly. A job asking
// for the remote evaluator is refused.
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { DppaClient, DppaRpcError, EvaluatorKind, JobState, pruneToFile } from '../client/index.js';
import { CLUSTER_ADMIN } from './fixtures/cluster-family.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { metricValue, startServe, type ServeProcess } from './fixtures/serve-process.js';
import { TINY, uniform, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { tinyLm } from './fixtures/tiny-lm.js';

const PARTIES = ['math', 'finance', 'law'] as const;

let dir: string;
let nats: NatsServer;
let base: string;
let deltas: string[];
let search: object;
const replicas: ServeProcess[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cluster-search-'));
  nats = await startNatsServer();
  const family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 9, finetunes: 3, deltaScale: 0.05 });
  base = family.base;
  deltas = PARTIES.map((p) => join(dir, `${p}.dppa`));
  await Promise.all(
    PARTIES.map((_, i) =>
      pruneToFile({ base, finetuned: family.finetuned[i]!, rate: 0.8, out: deltas[i]!, workers: 1 }),
    ),
  );
  const modelPath = join(dir, 'tiny-lm.onnx');
  await writeFile(modelPath, tinyLm(TINY.vocab, TINY.hidden));
  const r = uniform(78);
  const ids = (n: number): number[] => Array.from({ length: n }, () => Math.floor(r() * TINY.vocab));
  const tasks = join(dir, 'copy.jsonl');
  await writeFile(
    tasks,
    Array.from({ length: 8 }, () => JSON.stringify({ prompt_ids: ids(5), answer_ids: ids(2) })).join('\n'),
  );
  search = {
    upper: 1.5,
    evaluator: EvaluatorKind.EVALUATOR_KIND_ONNX,
    onnx: {
      modelPath,
      partyTasks: Object.fromEntries(PARTIES.map((p) => [p, { tasks: { copy: tasks } }])),
      partyFinetuned: Object.fromEntries(PARTIES.map((p, i) => [p, family.finetuned[i]!])),
      metric: 'log_likelihood',
    },
  };
  const args = [
    '--data',
    join(dir, 'data'),
    '--grpc-port',
    '0',
    '--metrics-port',
    '0',
    '--nats',
    nats.url,
    '--cluster',
  ];
  replicas.push(...(await Promise.all([0, 1].map(() => startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN })))));
});
after(async () => {
  await Promise.all(replicas.map((r) => r.kill()));
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

describe('the DPA search on a cluster', () => {
  it("spreads the parties' searches over the replicas and merges with the chosen factors", async () => {
    const admin = new DppaClient({ address: replicas[0]!.address, token: CLUSTER_ADMIN });
    try {
      const remote = await admin
        .createJob({
          basePath: base,
          parties: [...PARTIES],
          rate: 0.8,
          dpa: { search: { ...search, partyEvaluator: { law: EvaluatorKind.EVALUATOR_KIND_REMOTE } } },
        })
        .catch((e: unknown) => e);
      assert.ok(remote instanceof DppaRpcError && remote.code === status.UNIMPLEMENTED, String(remote));
      assert.match(remote.details, /party law: the remote evaluator/);

      const { job, tokens } = await admin.createJob({
        basePath: base,
        parties: [...PARTIES],
        rate: 0.8,
        dpa: { search },
        merge: { weights: { math: 1, finance: 0.5, law: 1 } },
      });
      await Promise.all(
        PARTIES.map(async (p, i) => {
          const party = new DppaClient({ address: replicas[i % 2]!.address, token: tokens[p]! });
          try {
            await party.push({ jobId: job.id, party: p, delta: deltas[i]! });
          } finally {
            party.close();
          }
        }),
      );
      for await (const e of admin.watchJob(job.id)) if (e.failed !== undefined) assert.fail(e.failed.reason);
      const done = await admin.getJob(job.id);
      assert.equal(done.state, JobState.JOB_STATE_MERGED, done.failureReason);

      for (const p of PARTIES) {
        const evaluations = done.evaluations.filter((e) => e.party === p);
        assert.ok(evaluations.length >= 3, `${p}: ${evaluations.length} evaluations`);
        assert.deepEqual(
          evaluations.map((e) => Number(e.seq)),
          evaluations.map((_, i) => i + 1),
          `${p}: every evaluation recorded once`,
        );
        assert.equal(
          new Set(evaluations.map((e) => e.factors.join())).size,
          evaluations.length,
          `${p}: no candidate evaluated twice`,
        );
        assert.ok(done.parties.find((x) => x.name === p)!.factorsFinal);
      }
      const searches = await Promise.all(
        replicas.map((r) => metricValue(r.metricsPort, 'dppa_cluster_tasks_total{kind="search",outcome="done"}')),
      );
      assert.equal(searches[0]! + searches[1]!, PARTIES.length, `search tasks per replica: ${searches.join(' / ')}`);
      assert.ok(
        searches.every((n) => n >= 1),
        `both replicas searched: ${searches.join(' / ')}`,
      );
      process.stdout.write(`# search tasks per replica: ${searches.join(' / ')}\n`);

      await assertMerged(
        base,
        join(dir, 'data', 'jobs', job.id, 'merged'),
        PARTIES.map((p, i) => ({
          delta: deltas[i]!,
          weight: ({ math: 1, finance: 0.5, law: 1 } as Record<string, number>)[p]!,
          factors: done.parties.find((x) => x.name === p)!.factors,
        })),
      );
    } finally {
      admin.close();
    }
  });
});
