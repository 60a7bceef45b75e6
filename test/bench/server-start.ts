/**
 * `npm run bench:start`: how long an embedded server takes to start over a
 * data folder holding many jobs. Creates `--jobs` jobs (three parties each,
 * on a tiny generated base; every fourth with one party's upload complete),
 * stops the server, then times `DppaServer.start()` in this process `--runs`
 * times (the median is printed) and, with `--cpu-prof`, prints the start's
 * hottest functions.
 *
 *   npm run bench:start [-- --jobs 400 --runs 5 --cpu-prof --dir DIR]
 *
 *   --dir DIR   keep the data folder in DIR, and reuse it if DIR/data exists (to time two versions of the
 *               server on the same jobs; --jobs is then what DIR holds)
 */
import { Session } from 'node:inspector/promises';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DppaClient, pruneToFile } from '../../client/index.js';
import { createLogger } from '../../server/log.js';
import { DppaServer } from '../../server/server.js';
import { TINY, writeLlamaFamily } from '../fixtures/synthetic-model.js';
import { median, printTopSelfTime, type CpuProfile } from './measure.js';

const { values: v } = parseArgs({
  options: {
    jobs: { type: 'string' },
    runs: { type: 'string' },
    'cpu-prof': { type: 'boolean' },
    dir: { type: 'string' },
  },
});
const jobs = Number(v.jobs ?? 400);
const runs = Number(v.runs ?? 5);
const ADMIN = 'bench-admin-token-0123456789';

const dir = v.dir ?? (await mkdtemp(join(tmpdir(), 'dppa-bench-start-')));
const reuse = existsSync(join(dir, 'data'));
await mkdir(dir, { recursive: true });
const server = (): DppaServer =>
  new DppaServer({
    adminToken: ADMIN,
    dataDir: join(dir, 'data'),
    grpcPort: 0,
    metricsPort: 0,
    logger: createLogger({ level: 'silent' }),
  });
async function prepare(): Promise<void> {
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 3 });
  const delta = join(dir, 'a.dppa');
  await pruneToFile({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.9, out: delta });
  const setup = server();
  await setup.start();
  const admin = new DppaClient({ address: `127.0.0.1:${setup.grpcPort}`, token: ADMIN });
  for (let i = 0; i < jobs; i++) {
    const { job, tokens } = await admin.createJob({ basePath: fam.base, parties: ['a', 'b', 'c'], rate: 0.9 });
    if (i % 4 !== 0) continue;
    const party = new DppaClient({ address: `127.0.0.1:${setup.grpcPort}`, token: tokens.a! });
    await party.push({ jobId: job.id, party: 'a', delta });
    party.close();
  }
  admin.close();
  await setup.stop();
}

try {
  if (!reuse) await prepare();

  const seconds: number[] = [];
  for (let r = 0; r < runs; r++) {
    const s = server();
    const session = v['cpu-prof'] === true && r === 0 ? new Session() : undefined;
    if (session !== undefined) {
      session.connect();
      await session.post('Profiler.enable');
      await session.post('Profiler.start');
    }
    const t = performance.now();
    await s.start();
    seconds.push((performance.now() - t) / 1000);
    if (session !== undefined) {
      const { profile } = await session.post('Profiler.stop');
      session.disconnect();
      printTopSelfTime('start', profile as CpuProfile);
    }
    await s.stop();
  }
  console.log(
    `${jobs} jobs (${Math.ceil(jobs / 4)} with an upload): start ${median(seconds).toFixed(3)} s median of ${runs} (${seconds.map((x) => x.toFixed(3)).join(', ')})`,
  );
} finally {
  if (v.dir === undefined) await rm(dir, { recursive: true, force: true });
}
