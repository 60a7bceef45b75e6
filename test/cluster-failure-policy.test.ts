// The one failure policy (server/jobs/failure-policy.ts) on both backends, with servers in this process: the JetStream
// backend on a real nats-server, and the local one. A merge task that keeps failing with an error that is neither
// damaged input nor storage (an extra file of the base that cannot be read) fails its job after --task-attempts runs,
// with the same reason on both, and leaves no task queued; so does a secure job whose SUPPORT phase cannot close (on a
// cluster the closing's claim is given up at each failure, not held for its lease); a full disk (a real tmpfs, needs
// root) pauses a cluster job (Job.pause) as it does an embedded one, without counting against the attempts, with one
// `paused` event however many of its tasks meet the full disk, and it merges once room is back.
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { type ServiceError, status } from '@grpc/grpc-js';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { DppaClient } from '../client/index.js';
import { JobState, Privacy, SecurePhase, type Job, type JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import type { ServerOptions } from '../server/config.js';
import { TASKS_STREAM, taskSubject } from '../server/nats/subjects.js';
import { assertMerged } from './fixtures/expected-merge.js';
import {
  ADMIN,
  auth,
  call,
  createJobRequest,
  pruneRecords,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from './fixtures/grpc-harness.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { writeLlamaFamily, type LlamaShape } from './fixtures/synthetic-model.js';
import { mountTmpfsDisk } from './fixtures/tmpfs-disk.js';

/** About 2 MB of bf16 weights: the merged output does not fit where an upload (about 0.3 MB) still does. */
const SHAPE: LlamaShape = { layers: 4, hidden: 128, intermediate: 384, vocab: 512 };
/** Free bytes that take one party's upload but not the merged output (as in server-disk-full.test.ts). */
const ROOM_FOR_AN_UPLOAD = 1_100_000;

const dir = await mkdtemp(join(tmpdir(), 'dppa-failure-policy-'));
const tmpfs = mountTmpfsDisk(join(dir, 'disk'), 16 * 1024 * 1024);
let base: string;
let finetuned: string;
/** The base with an extra file (tokenizer.json) that cannot be read: a dangling link. */
let brokenBase: string;
let records: DeltaRecord[];
const servers: NatsServer[] = [];

before(async () => {
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: SHAPE, seed: 33, finetunes: 1 });
  base = fam.base;
  finetuned = fam.finetuned[0]!;
  records = await pruneRecords({ base, finetuned: fam.finetuned[0]!, rate: 0.9 });
  brokenBase = join(dir, 'broken-base');
  await cp(base, brokenBase, { recursive: true });
  await rm(join(brokenBase, 'tokenizer.json'));
  await symlink(join(dir, 'nowhere.json'), join(brokenBase, 'tokenizer.json'));
});
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
  tmpfs.unmount();
  await rm(dir, { recursive: true, force: true });
});

/** A server over `data`: a replica of a cluster on its own nats-server, or an embedded one. */
async function serve(mode: 'cluster' | 'embedded', data: string, opts: Partial<ServerOptions>): Promise<Harness> {
  await mkdir(data, { recursive: true });
  if (mode === 'embedded') return startHarness(data, opts);
  const nats = await startNatsServer();
  servers.push(nats);
  return startHarness(data, { cluster: true, nats: { url: nats.url }, ...opts });
}

async function createJob(h: Harness, basePath: string): Promise<{ jobId: string; token: string }> {
  const r = await call(h.jobs, 'createJob', createJobRequest({ basePath, parties: ['a'] }), ADMIN);
  return { jobId: r.job!.id, token: r.tokens.a! };
}

/** Resolves with the first event of the job matching `match`, then stops watching. */
function nextEvent(h: Harness, jobId: string, match: (e: JobEvent) => boolean): Promise<JobEvent> {
  return new Promise((resolve, reject) => {
    const stream = h.jobs.watchJob({ jobId, afterSeq: 0n }, auth(ADMIN));
    stream.on('data', (e: JobEvent) => {
      if (!match(e)) return;
      resolve(e);
      stream.cancel();
    });
    stream.on('error', (err: ServiceError) => {
      if (err.code !== status.CANCELLED) reject(err);
    });
    stream.on('end', () => reject(new Error('the watch ended without the event')));
  });
}

/** Every event of the job up to the first matching `match` (included). */
function eventsUntil(h: Harness, jobId: string, match: (e: JobEvent) => boolean): Promise<JobEvent[]> {
  const seen: JobEvent[] = [];
  return nextEvent(h, jobId, (e) => {
    seen.push(e);
    return match(e);
  }).then(() => seen);
}

/** Tasks of the job's merge still in the replicas' queue. */
async function queuedTasks(natsUrl: string, jobId: string): Promise<number> {
  const nc = await connect({ servers: natsUrl });
  try {
    const jsm = await jetstreamManager(nc);
    let n = 0;
    for (const kind of ['plan', 'tensor', 'commit'] as const) {
      const subject = taskSubject(jobId, kind);
      const info = await jsm.streams.info(TASKS_STREAM, { subjects_filter: subject });
      n += info.state.subjects?.[subject] ?? 0;
    }
    return n;
  } finally {
    await nc.close();
  }
}

// A job left hanging would keep the test waiting: it fails instead.
describe('a merge task that keeps failing with an error that may pass', { timeout: 120_000 }, () => {
  const reasons = new Map<string, Job>();
  for (const mode of ['cluster', 'embedded'] as const) {
    it(`fails its job after --task-attempts runs, naming them (${mode})`, async () => {
      const h = await serve(mode, join(dir, `data-${mode}`), { taskAttempts: 2, mergeWorkers: 0 });
      try {
        const { jobId, token } = await createJob(h, brokenBase);
        const failed = nextEvent(h, jobId, (e) => e.failed !== undefined);
        assert.equal((await upload(h.uploads, token, uploadMessages(jobId, 'a', records))).complete, true);
        const event = await failed;
        const job = await call(h.jobs, 'getJob', { jobId }, ADMIN);
        assert.equal(job.state, JobState.JOB_STATE_FAILED);
        assert.equal(job.failureReason, event.failed!.reason);
        assert.match(
          job.failureReason,
          /^merge failed after 2 attempts: ENOENT: no such file or directory, stat '.*broken-base\/tokenizer\.json'$/,
        );
        assert.equal(job.pause, undefined);
        reasons.set(mode, job);
        if (mode === 'cluster') {
          // The plan task was terminated, not handed back for ever (term follows the job's failure closely).
          const url = servers.at(-1)!.url;
          let queued = await queuedTasks(url, jobId);
          for (let i = 0; i < 100 && queued > 0; i++) {
            await sleep(100);
            queued = await queuedTasks(url, jobId);
          }
          assert.equal(queued, 0, 'no task of the failed job left in the queue');
        }
      } finally {
        await h.close();
      }
    });
  }

  it('gives the same end state on both backends', () => {
    const [cluster, embedded] = [reasons.get('cluster'), reasons.get('embedded')];
    assert.ok(cluster !== undefined && embedded !== undefined, 'both runs above completed');
    assert.equal(cluster.state, embedded.state);
    assert.equal(cluster.failureReason, embedded.failureReason);
  });
});

describe('a secure phase whose closing keeps failing with an unexpected error', { timeout: 120_000 }, () => {
  for (const mode of ['cluster', 'embedded'] as const) {
    it(`fails its job after --task-attempts runs, the phase left open (${mode})`, async () => {
      const data = join(dir, `data-secure-${mode}`);
      const h = await serve(mode, data, { taskAttempts: 2, mergeWorkers: 0 });
      const clients: DppaClient[] = [];
      /** Ends the wait for the failure below once the test is over. */
      const patience = new AbortController();
      try {
        const parties = ['a', 'b'];
        const r = await call(
          h.jobs,
          'createJob',
          createJobRequest({ basePath: base, parties, privacy: Privacy.PRIVACY_SECURE, threshold: 2, clipBound: 1 }),
          ADMIN,
        );
        const jobId = r.job!.id;
        const failed = nextEvent(h, jobId, (e) => e.failed !== undefined);
        // A file where the job's secure folder goes: building U fails (ENOTDIR), closing SUPPORT each time it runs.
        await writeFile(join(data, 'jobs', jobId, 'secure'), 'not a folder');
        // Both parties upload their supports (the same fine-tune), then wait for KEYS until the job fails.
        const pushes = parties.map((party) => {
          const c = new DppaClient({ address: h.address, token: r.tokens[party]! });
          clients.push(c);
          const workDir = join(dir, `secure-${mode}-${party}`);
          const pushed = c.push({ jobId, party, base, finetuned, workers: 1, secure: { workDir, pollMs: 50 } });
          // Awaited below; handled here too, as a failure before then would be an unhandled rejection.
          pushed.catch(() => undefined);
          return pushed;
        });
        // Two attempts 1 s apart: a minute is ample under load (a closing claim left by the first would hold the
        // phase for its 10-minute lease). Bounded here rather than by the suite's timeout, which would leave the
        // server open (this finally not run) and the test file's process with it.
        const event = await Promise.race([
          failed,
          sleep(60_000, undefined, { signal: patience.signal }).then(() =>
            assert.fail('the job did not fail within a minute'),
          ),
        ]);
        const job = await call(h.jobs, 'getJob', { jobId }, ADMIN);
        assert.equal(job.state, JobState.JOB_STATE_FAILED);
        assert.equal(job.failureReason, event.failed!.reason);
        assert.match(job.failureReason, /^secure aggregation failed after 2 attempts: /);
        assert.equal(job.securePhase, SecurePhase.SECURE_PHASE_SUPPORT);
        for (const p of pushes) await assert.rejects(p, /job \S+ failed: secure aggregation failed after 2 attempts/);
      } finally {
        patience.abort();
        for (const c of clients) c.close();
        await h.close();
      }
    });
  }
});

describe(
  'a full disk on a cluster',
  { skip: tmpfs.mounted ? false : 'mounting a tmpfs needs root', timeout: 120_000 },
  () => {
    it('pauses the job (Job.pause) without counting against the attempts, and merges once room is back', async () => {
      const data = join(tmpfs.path, 'data');
      // One attempt: a storage failure counted against it would fail the job at its first redelivery.
      const h = await serve('cluster', data, { taskAttempts: 1, mergeWorkers: 0, storageRetryMs: 3_600_000 });
      try {
        const { jobId, token } = await createJob(h, base);
        await tmpfs.fill(ROOM_FOR_AN_UPLOAD);
        const paused = nextEvent(h, jobId, (e) => e.paused !== undefined);
        assert.equal((await upload(h.uploads, token, uploadMessages(jobId, 'a', records))).complete, true);
        const e = await paused;
        assert.match(e.paused!.reason, /no space left on the server's disk \(ENOSPC\)/);
        assert.ok((await tmpfs.freeBytes()) < 2_000_000, 'the merged output (2 MB) did not fit');
        const shown = await call(h.jobs, 'getJob', { jobId }, ADMIN);
        assert.equal(shown.state, JobState.JOB_STATE_MERGING, 'paused, not failed');
        assert.equal(shown.failureReason, '');
        assert.match(shown.pause?.reason ?? '', /no space left on the server's disk \(ENOSPC\)/);
        assert.equal(shown.pause?.attempts, 1);
        // Meanwhile the tasks come back (after 1 s, 2 s…) and meet the full disk again: one pause still.
        await sleep(4000);
        assert.equal((await call(h.jobs, 'getJob', { jobId }, ADMIN)).pause?.attempts, 1);

        // The failed tasks come back on their own (within their backoff) and find the room.
        const merged = eventsUntil(h, jobId, (ev) => ev.merged !== undefined);
        await tmpfs.unfill();
        const events = await merged;
        assert.equal(events.filter((ev) => ev.paused !== undefined).length, 1, 'one paused event');
        const done = await call(h.jobs, 'getJob', { jobId }, ADMIN);
        assert.equal(done.state, JobState.JOB_STATE_MERGED, done.failureReason);
        assert.equal(done.pause, undefined);
        await assertMerged(base, join(data, 'jobs', jobId, 'merged'), [
          { records, weight: 1, factors: records[0]!.header!.levels.map(() => 1) },
        ]);
      } finally {
        await h.close();
      }
    });
  },
);
