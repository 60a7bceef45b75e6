/**
 * The embedded job store shows a change only once it is written: nobody reads a state that a crash would lose, and
 * a failed write or a change that throws leaves the job as it was (in memory and on disk). Both stores show a new
 * version on the object callers hold, without the fields it no longer has (the KV store on a real nats-server).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { jetstream } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { connect } from '@nats-io/transport-node';
import { DpaConfig, JobState, MergeOptions } from '../proto/gen/dppa/v1/jobs.js';
import { KvJobStore } from '../server/cluster/kv-job-store.js';
import { decodeJob, LocalJobStore, type JobStore, type StoredJob } from '../server/jobs/job-store.js';
import { createLogger } from '../server/log.js';
import { JOBS_BUCKET } from '../server/nats/subjects.js';
import { startNatsServer } from './fixtures/nats-server.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-job-store-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function job(id: string): StoredJob {
  const now = new Date().toISOString();
  return {
    id,
    label: '0',
    state: JobState.JOB_STATE_COLLECTING,
    basePath: '/nowhere',
    baseFingerprint: 'f',
    baseBytes: 0,
    rate: 0.9,
    method: 'dp',
    dpa: DpaConfig.fromPartial({ off: true }),
    merge: MergeOptions.fromPartial({}),
    parties: [{ name: 'a', tokenSha256: '00', joined: false }],
    evaluations: [],
    maxUploadBytes: 1,
    maxAbsValue: 1,
    failureReason: '',
    createdAt: now,
    updatedAt: now,
    merged: undefined,
  };
}

const log = createLogger({ level: 'error' });

describe('LocalJobStore: write, then serve', () => {
  it('a reader never sees a change before it is on disk', async () => {
    const data = join(dir, 'seen');
    const store = await LocalJobStore.open(data, log);
    const held = await store.create(job('j1'));
    const file = join(data, 'jobs', 'j1', 'job.json');
    let seenBeforeWritten = 0;
    let checks = 0;
    const updates = [1, 2, 3, 4, 5].map((n) =>
      store.update('j1', (j) => {
        j.label = String(n);
      }),
    );
    // Every turn of the event loop until the writes end: whatever a reader sees is already in job.json.
    let done = false;
    const all = Promise.all(updates).finally(() => (done = true));
    while (!done) {
      const shown = store.get('j1').label;
      const onDisk = decodeJob(readFileSync(file, 'utf8'), file).label;
      checks++;
      if (Number(shown) > Number(onDisk)) seenBeforeWritten++;
      await new Promise((r) => setImmediate(r));
    }
    await all;
    assert.equal(seenBeforeWritten, 0, `${seenBeforeWritten} of ${checks} reads showed a label not yet written`);
    assert.ok(checks > 1, 'the reads ran while the writes were under way');
    assert.equal(store.get('j1'), held, 'the object callers hold stays the job');
    assert.equal(held.label, '5', 'the last change wins');
    assert.equal(decodeJob(readFileSync(file, 'utf8'), file).label, '5');
  });

  it('a write that fails, or a change that throws, leaves the job as it was', async () => {
    const data = join(dir, 'fails');
    const store = await LocalJobStore.open(data, log);
    await store.create(job('j2'));
    await assert.rejects(
      store.update('j2', (j) => {
        j.label = 'half';
        throw new Error('given up');
      }),
      /given up/,
    );
    assert.equal(store.get('j2').label, '0');
    // job.json a non-empty folder: the rename onto it fails.
    const file = join(data, 'jobs', 'j2', 'job.json');
    await rm(file);
    await mkdir(join(file, 'blocker'), { recursive: true });
    await assert.rejects(
      store.update('j2', (j) => {
        j.label = 'lost';
        j.state = JobState.JOB_STATE_FAILED;
      }),
    );
    assert.equal(store.get('j2').label, '0', 'a change not written is not shown');
    assert.equal(store.get('j2').state, JobState.JOB_STATE_COLLECTING);
  });
});

/** A change that unsets a field (absent from the stored JSON): the object callers hold loses it too. */
async function removesField(store: JobStore, id: string): Promise<void> {
  const held = await store.create(job(id));
  await store.update(id, (j) => {
    j.merged = { files: [], seconds: 1 };
  });
  assert.deepEqual(held.merged, { files: [], seconds: 1 });
  await store.update(id, (j) => {
    j.merged = undefined;
  });
  assert.equal(store.get(id), held, 'the object callers hold stays the job');
  assert.equal(held.merged, undefined, 'the field unset is gone from it');
}

describe('both stores: a new version replaces the held one, fields removed included', () => {
  it('embedded', async () => {
    await removesField(await LocalJobStore.open(join(dir, 'removed'), log), 'j3');
  });

  it('KV bucket (real nats-server)', async () => {
    const nats = await startNatsServer();
    const nc = await connect({ servers: nats.url });
    const kv = await new Kvm(jetstream(nc)).create(JOBS_BUCKET, { history: 1 });
    const store = await KvJobStore.open({ kv, dataDir: join(dir, 'kv'), log });
    try {
      await removesField(store, 'j4');
    } finally {
      await store.close();
      await nc.close();
      await nats.close();
    }
  });
});
