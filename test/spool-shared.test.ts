// A data folder shared by replicas: a replica deleting a merged job's uploads returns only once no tensor file is
// left, even when another replica began deleting them first (the race behind test/cluster-replicas.test.ts finding
// tensor files after `merged`: docs/design/job-flow.md).
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalJobStore } from '../server/jobs/job-store.js';
import { createLogger } from '../server/log.js';
import { Spool } from '../server/uploads/spool.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { ADMIN, call, pruneRecords, startHarness, upload, uploadMessages } from './fixtures/grpc-harness.js';

const log = createLogger({ level: 'silent' });
let dir: string;
let data: string;
let jobId: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-spool-shared-'));
  data = join(dir, 'data');
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 5 });
  const records = await pruneRecords({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.8 });
  // Party a's upload complete, b's not: the job stays COLLECTING and a's tensor files stay on disk.
  const h = await startHarness(data, {});
  try {
    const r = await call(
      h.jobs,
      'createJob',
      {
        basePath: fam.base,
        parties: ['a', 'b'],
        rate: 0.8,
        method: 'dp',
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
    jobId = r.job!.id;
    await upload(h.uploads, r.tokens.a!, uploadMessages(jobId, 'a', records));
  } finally {
    await h.close();
  }
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('a spool in a shared folder', () => {
  it('deletes every tensor file of a merged job even when another replica began deleting them', async () => {
    const store = await LocalJobStore.open(data, log);
    const mine = await Spool.open({ store, log, shared: true });
    const other = await Spool.open({ store, log, shared: true });
    const folder = join(data, 'jobs', jobId, 'uploads', 'a');
    const tensorFiles = async (): Promise<string[]> => (await readdir(folder)).filter((f) => /^\d+\.dppa$/.test(f));
    const before = await tensorFiles();
    assert.ok(before.length >= 2, 'party a has several tensor files');
    assert.equal(mine.party(jobId, 'a').complete, true);

    // The other replica is midway through deleting: its list of what was held is written, one file is gone.
    const held = [...other.party(jobId, 'a').held.values()].map(({ name, index, bytes }) => ({ name, index, bytes }));
    await writeFile(join(folder, 'discarded.json'), `${JSON.stringify(held)}\n`);
    await rm(join(folder, before[0]!));

    await mine.discardJob(jobId);
    assert.deepEqual(await tensorFiles(), [], 'no tensor file is left when discardJob returns');
    assert.equal(mine.party(jobId, 'a').discarded, true);
    assert.equal(mine.party(jobId, 'a').held.size, held.length, 'the party is still shown with everything it sent');
  });
});
