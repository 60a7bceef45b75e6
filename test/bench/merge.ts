/**
 * Merge throughput of the server's merge driver: an in-process server merges
 * two pruned deltas of a mid-sized synthetic model, with the additions inline
 * (0 merge workers) and on 1 and 2 worker threads, each twice, a fresh server
 * and job per run. Prints one line per run, then one JSON line of every run.
 *
 *   npm run bench:merge -- [layers=4] [hidden=1024]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { ADMIN, call, pruneRecords, startHarness, upload, uploadMessages, watchAll } from '../fixtures/grpc-harness.js';
import { writeLlamaFamily } from '../fixtures/synthetic-model.js';

if (process.argv.includes('--help') || process.argv.includes('-h')) {
  console.log(`Usage: npm run bench:merge -- [layers=4] [hidden=1024]

Times the merge of two parties' pruned deltas (rate 0.9) of a synthetic Llama-like model
(intermediate = 2.75 x hidden, vocab 8000) by an in-process server, with 0, 1 and 2 merge
worker threads, each twice. Per run it prints the merge time the server records (merge start
to commit, incl. fsync and SHA-256 of the output), the time from the last upload's answer to
the merged event, and the process's CPU over the last upload and the merge; the last line is
the runs as JSON.`);
  process.exit(0);
}

const layers = Number(process.argv[2] ?? 4);
const hidden = Number(process.argv[3] ?? 1024);
const dir = await mkdtemp(join(tmpdir(), 'dppa-bench-merge-'));

interface Run {
  workers: number;
  baseBytes: number;
  mergeSeconds: number;
  untilMergedSeconds: number;
  cpuSeconds: number;
}

/** One job on a fresh server with `workers` merge threads: uploads both parties, waits for the merged event. */
async function mergeRun(base: string, records: DeltaRecord[][], workers: number, run: number): Promise<Run> {
  const h = await startHarness(join(dir, `data-${run}`), { mergeWorkers: workers });
  try {
    const r = await call(
      h.jobs,
      'createJob',
      {
        basePath: base,
        parties: ['a', 'b'],
        rate: 0.9,
        method: 'magnitude',
        label: '',
        dpa: undefined,
        merge: undefined,
        maxAbsValue: 0,
        pruneMethod: 0,
        privacy: 0,
        threshold: 0,
        clipBound: 0,
        securePhaseSeconds: 0,
      },
      ADMIN,
    );
    const jobId = r.job!.id;
    const events = watchAll(h.jobs, ADMIN, jobId);
    await upload(h.uploads, r.tokens.a!, uploadMessages(jobId, 'a', records[0]!));
    // The last upload starts the merge.
    const cpu0 = process.cpuUsage();
    await upload(h.uploads, r.tokens.b!, uploadMessages(jobId, 'b', records[1]!));
    const t0 = performance.now();
    const merged = (await events).at(-1)?.merged;
    const untilMergedSeconds = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    if (merged === undefined) throw new Error(`job ${jobId} did not merge`);
    return {
      workers,
      baseBytes: await baseBytes(base),
      mergeSeconds: merged.seconds,
      untilMergedSeconds,
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
    };
  } finally {
    await h.close();
  }
}

async function baseBytes(base: string): Promise<number> {
  const b = await Checkpoint.open(base);
  try {
    return b.tensors().reduce((n, t) => n + t.byteLength, 0);
  } finally {
    await b.close();
  }
}

try {
  const fam = await writeLlamaFamily(join(dir, 'family'), {
    shape: { layers, hidden, intermediate: Math.round(hidden * 2.75), vocab: 8000 },
    finetunes: 2,
  });
  const records = await Promise.all(
    fam.finetuned.map((finetuned) =>
      pruneRecords({ base: fam.base, finetuned, rate: 0.9, method: 'magnitude', workers: 2 }),
    ),
  );
  const runs: Run[] = [];
  for (const [i, workers] of [0, 1, 2, 0, 1, 2].entries()) {
    const run = await mergeRun(fam.base, records, workers, i);
    runs.push(run);
    const mb = run.baseBytes / 1e6;
    console.log(
      `merge of 2 parties, ${mb.toFixed(0)} MB base, ${workers} workers: ${run.mergeSeconds.toFixed(2)} s in the server (${(mb / run.mergeSeconds).toFixed(0)} MB/s, incl. fsync and SHA-256); merged event ${run.untilMergedSeconds.toFixed(2)} s after the last upload's answer; CPU ${run.cpuSeconds.toFixed(2)} s (all threads, last upload and merge)`,
    );
  }
  console.log(JSON.stringify({ layers, hidden, runs }));
} finally {
  await rm(dir, { recursive: true, force: true });
}
