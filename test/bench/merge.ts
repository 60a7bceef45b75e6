/**
 * Merge throughput: uploads two pruned deltas of a mid-sized synthetic model
 * to an in-process server, then times the merge of the spooled uploads with
 * the additions inline (0 workers) and on 1 and 2 worker threads. Prints one line per run.
 *
 *   npx tsx test/bench/merge.ts [layers=4] [hidden=1024]
 */
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mergeCheckpoint } from '../../server/merge/merger.js';
import { ADMIN, call, pruneRecords, startHarness, upload, uploadMessages } from '../fixtures/grpc-harness.js';
import { writeLlamaFamily } from '../fixtures/synthetic-model.js';

const layers = Number(process.argv[2] ?? 4);
const hidden = Number(process.argv[3] ?? 1024);
const dir = await mkdtemp(join(tmpdir(), 'dppa-bench-merge-'));
try {
  const fam = await writeLlamaFamily(join(dir, 'family'), {
    shape: { layers, hidden, intermediate: Math.round(hidden * 2.75), vocab: 8000 },
    finetunes: 2,
  });
  const h = await startHarness(join(dir, 'data'), { keepUploads: true });
  try {
    const r = await call(
      h.jobs,
      'createJob',
      {
        basePath: fam.base,
        parties: ['a', 'b'],
        rate: 0.9,
        method: 'magnitude',
        label: '',
        dpa: undefined,
        merge: undefined,
        maxAbsValue: 0,
        pruneMethod: 0,
      },
      ADMIN,
    );
    const jobId = r.job!.id;
    for (const [i, party] of ['a', 'b'].entries()) {
      const records = await pruneRecords({
        base: fam.base,
        finetuned: fam.finetuned[i]!,
        rate: 0.9,
        method: 'magnitude',
        workers: 2,
      });
      await upload(h.uploads, r.tokens[party]!, uploadMessages(jobId, party, records));
    }
    const spool = join(dir, 'data', 'jobs', jobId, 'uploads');
    const parties = await Promise.all(
      ['a', 'b'].map(async (name) => {
        const header = JSON.parse(await readFile(join(spool, name, 'header.json'), 'utf8')) as {
          tensors: { name: string }[];
        };
        const files = (await readdir(join(spool, name))).filter((f) => f.endsWith('.dppa'));
        return {
          name,
          weight: 1,
          factors: [1],
          tensors: new Map(files.map((f) => [header.tensors[Number.parseInt(f, 10)]!.name, join(spool, name, f)])),
        };
      }),
    );
    for (const workers of [0, 1, 2, 0, 1, 2]) {
      let bytes = 0;
      let tensorsAt = 0;
      const t0 = performance.now();
      const cpu0 = process.cpuUsage();
      await mergeCheckpoint({
        basePath: fam.base,
        outDir: join(dir, `out-${workers}`),
        parties,
        outsideByMax: false,
        workers,
        onProgress: (p) => {
          bytes += p.tensorBytes;
          tensorsAt = performance.now();
        },
      });
      const s = (performance.now() - t0) / 1000;
      const t = (tensorsAt - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      console.log(
        `merge of 2 parties, ${(bytes / 1e6).toFixed(0)} MB base, ${workers} workers: ${s.toFixed(2)} s (${(bytes / 1e6 / s).toFixed(0)} MB/s); tensors written after ${t.toFixed(2)} s, then fsync and SHA-256; CPU ${((cpu.user + cpu.system) / 1e6).toFixed(2)} s (all threads)`,
      );
    }
  } finally {
    await h.close();
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
