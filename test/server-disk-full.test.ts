/**
 * A full disk, for real: the data folder on a small tmpfs (mounting needs
 * root, which CI has; elsewhere the mounted tests are skipped), filled up to a
 * chosen number of free bytes by a ballast file.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFile, mkdir, mkdtemp, readdir, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type ServiceError, status } from '@grpc/grpc-js';
import { JobState, type JobEvent, type JobServiceClient } from '../proto/gen/dppa/v1/jobs.js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { FileJobEvents } from '../server/jobs/job-events.js';
import { createLogger } from '../server/log.js';
import { toStatus } from '../server/rpc/status.js';
import { assertMerged } from './fixtures/expected-merge.js';
import type { LlamaShape } from './fixtures/synthetic-model.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  auth,
  call,
  pruneRecords,
  rejectsWith,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from './fixtures/grpc-harness.js';

/** About 2 MB of bf16 weights: the merged output does not fit where an upload (about 0.3 MB) still does. */
const SHAPE: LlamaShape = { layers: 4, hidden: 128, intermediate: 384, vocab: 512 };
const DISK_BYTES = 16 * 1024 * 1024;
/** Free bytes that take one party's upload (about 0.5 MB of records, 0.65 MB on disk) but not the merged output. */
const ROOM_FOR_AN_UPLOAD = 1_100_000;

const dir = await mkdtemp(join(tmpdir(), 'dppa-disk-full-'));
const disk = join(dir, 'disk');
const data = join(disk, 'data');
const ballast = join(disk, 'ballast');
const mounted = mountTmpfs(disk);

function mountTmpfs(at: string): boolean {
  try {
    execFileSync('mkdir', ['-p', at]);
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${DISK_BYTES}`, 'tmpfs', at], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Bytes a new file could take on the tmpfs now. */
async function freeBytes(): Promise<number> {
  const fs = await statfs(disk);
  return fs.bavail * fs.bsize;
}

/** Fills the disk so that `leave` bytes stay free. */
async function fill(leave: number): Promise<void> {
  await rm(ballast, { force: true });
  await writeFile(ballast, Buffer.alloc(Math.max(0, (await freeBytes()) - leave)));
}

/** Frees what the ballast took. */
function unfill(): Promise<void> {
  return rm(ballast, { force: true });
}

/** Resolves with the first event of the job matching `match`, then stops watching. */
function nextEvent(jobs: JobServiceClient, jobId: string, match: (e: JobEvent) => boolean): Promise<JobEvent> {
  return new Promise((resolve, reject) => {
    const stream = jobs.watchJob({ jobId, afterSeq: 0n }, auth(ADMIN));
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

/** Files of a folder whose name marks them temporary. */
async function temporaries(folder: string): Promise<string[]> {
  const found: string[] = [];
  for (const e of await readdir(folder, { withFileTypes: true, recursive: true }))
    if (e.name.includes('.tmp-')) found.push(e.name);
  return found;
}

let base: string;
let records: DeltaRecord[][];
let h: Harness | undefined;

/**
 * Asserts that the job's served output is the merge of the parties' uploads (weight 1, factors 1), computed
 * independently (fixtures/expected-merge.ts): every tensor bit for bit, the base's files, and the sizes and
 * SHA-256 the server lists are those of the files on disk.
 */
async function assertMergedUploads(jobId: string, parties: number[]): Promise<void> {
  const out = join(data, 'jobs', jobId, 'merged');
  const expected = parties.map((i) => ({
    records: records[i]!,
    weight: 1,
    factors: records[i]![0]!.header!.levels.map(() => 1),
  }));
  await assertMerged(base, out, expected);
  const files = (await call(h!.downloads, 'listFiles', { jobId }, ADMIN)).files;
  assert.deepEqual(
    files.map((f) => f.path),
    (await readdir(base)).sort(),
    'the base checkpoint files, merged or copied',
  );
  assert.deepEqual(
    files.map((f) => ({ path: f.path, size: f.size, sha256: f.sha256 })),
    await Promise.all(
      files.map(async (f) => {
        const bytes = await readFile(join(out, f.path));
        return { path: f.path, size: BigInt(bytes.length), sha256: createHash('sha256').update(bytes).digest('hex') };
      }),
    ),
  );
}

async function createJob(parties: string[]): Promise<{ jobId: string; tokens: Record<string, string> }> {
  const r = await call(
    h!.jobs,
    'createJob',
    {
      basePath: base,
      parties,
      rate: 0.9,
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
  return { jobId: r.job!.id, tokens: r.tokens };
}

describe('a full disk', { skip: mounted ? false : 'mounting a tmpfs needs root' }, () => {
  before(async () => {
    const fam = await writeLlamaFamily(join(dir, 'family'), { shape: SHAPE, seed: 21, finetunes: 2 });
    base = fam.base;
    records = await Promise.all(fam.finetuned.map((finetuned) => pruneRecords({ base, finetuned, rate: 0.9 })));
    await mkdir(data);
    // No automatic retry in the first tests: the job waits for ResumeJob.
    h = await startHarness(data, { storageRetryMs: 3_600_000, mergeWorkers: 0 });
  });
  after(async () => {
    await h?.close();
    execFileSync('umount', [disk]);
    await rm(dir, { recursive: true, force: true });
  });

  it('CreateJob gets RESOURCE_EXHAUSTED and leaves no job folder', async () => {
    await fill(0);
    await rejectsWith(
      call(
        h!.jobs,
        'createJob',
        {
          basePath: base,
          parties: ['a'],
          rate: 0.9,
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
      ),
      status.RESOURCE_EXHAUSTED,
      /no space left on the server's disk \(ENOSPC\)/,
    );
    assert.deepEqual(await readdir(join(data, 'jobs')), []);
    assert.deepEqual((await call(h!.jobs, 'listJobs', {}, ADMIN)).jobs, []);
    await unfill();
  });

  it('an upload gets RESOURCE_EXHAUSTED, keeps no partial tensor, and completes once space is freed', async () => {
    const { jobId, tokens } = await createJob(['a', 'b']);
    await fill(100_000);
    await rejectsWith(
      upload(h!.uploads, tokens.a!, uploadMessages(jobId, 'a', records[0]!)),
      status.RESOURCE_EXHAUSTED,
      /no space left/,
    );
    const spool = join(data, 'jobs', jobId, 'uploads', 'a');
    assert.deepEqual(await temporaries(spool), []);
    const kept = await call(h!.uploads, 'getUploadState', { jobId, party: 'a' }, tokens.a!);
    assert.equal(kept.complete, false);
    await unfill();
    assert.equal((await upload(h!.uploads, tokens.a!, uploadMessages(jobId, 'a', records[0]!))).complete, true);
  });

  it('a merge that fills the disk pauses the job; ResumeJob merges it once space is freed, bit-identical', async () => {
    const { jobId, tokens: t } = await createJob(['a', 'b']);
    for (const [i, party] of ['a', 'b'].entries()) {
      if (party === 'b') await fill(ROOM_FOR_AN_UPLOAD);
      const paused = party === 'b' ? nextEvent(h!.jobs, jobId, (e) => e.paused !== undefined) : undefined;
      assert.equal((await upload(h!.uploads, t[party]!, uploadMessages(jobId, party, records[i]!))).complete, true);
      if (paused !== undefined) {
        const e = await paused;
        assert.match(e.paused!.reason, /no space left on the server's disk \(ENOSPC\)/);
        assert.equal(e.paused!.attempts, 1);
      }
    }
    assert.ok((await freeBytes()) < 2_000_000, 'the merged output (2 MB) did not fit');
    const shown = await call(h!.jobs, 'getJob', { jobId }, ADMIN);
    assert.equal(shown.state, JobState.JOB_STATE_MERGING, 'paused, not failed');
    assert.equal(shown.failureReason, '');
    assert.equal(shown.pause?.attempts, 1);
    assert.notEqual(shown.pause?.nextAttemptAt, '');
    const jobDir = join(data, 'jobs', jobId);
    assert.deepEqual(
      (await readdir(jobDir)).filter((f) => f.startsWith('merged')),
      [],
      'no partial output left',
    );

    await unfill();
    const merged = nextEvent(h!.jobs, jobId, (e) => e.merged !== undefined);
    const resumed = await call(h!.jobs, 'resumeJob', { jobId }, ADMIN);
    assert.equal(resumed.pause?.nextAttemptAt, '', 'an attempt runs now');
    await merged;
    const done = await call(h!.jobs, 'getJob', { jobId }, ADMIN);
    assert.equal(done.state, JobState.JOB_STATE_MERGED);
    assert.equal(done.pause, undefined);
    await assertMergedUploads(jobId, [0, 1]);
    await rejectsWith(
      call(h!.jobs, 'resumeJob', { jobId }, ADMIN),
      status.FAILED_PRECONDITION,
      /MERGED: there is nothing to resume/,
    );
  });

  it('a paused merge is tried again on its own once space is back; a restart removes what a failed creation left', async () => {
    await h!.close();
    // What a creation cut off (a crash, or an older server's failed CreateJob) leaves: a folder with an event log at most.
    await mkdir(join(data, 'jobs', 'leftover1'));
    await writeFile(join(data, 'jobs', 'leftover1', 'events.jsonl'), '');
    await mkdir(join(data, 'jobs', 'leftover2'));
    h = await startHarness(data, { storageRetryMs: 20, mergeWorkers: 0 });
    assert.ok(!(await readdir(join(data, 'jobs'))).some((f) => f.startsWith('leftover')));

    const { jobId, tokens } = await createJob(['a']);
    await fill(ROOM_FOR_AN_UPLOAD);
    const paused = nextEvent(h.jobs, jobId, (e) => e.paused !== undefined);
    await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', records[0]!));
    await paused;
    // Still no room: the runner looks every few tens of milliseconds but starts no merge (no second paused event).
    const shown = await call(h.jobs, 'getJob', { jobId }, ADMIN);
    assert.equal(shown.state, JobState.JOB_STATE_MERGING);
    assert.equal(shown.pause?.attempts, 1);
    const merged = nextEvent(h.jobs, jobId, (e) => e.merged !== undefined);
    await unfill();
    await merged;
    await assertMergedUploads(jobId, [0]);
    assert.equal((await freeBytes()) > 0, true);
  });
});

describe('storage errors, without a mount', () => {
  const log = createLogger({ level: 'silent' });
  const fsError = (code: string): Error =>
    Object.assign(new Error(`${code}: something failed, open '/srv/dppa/jobs/x/job.json'`), { code });

  it('maps a full disk or quota to RESOURCE_EXHAUSTED and passing I/O failures to UNAVAILABLE, without the server paths', () => {
    for (const [code, expected] of [
      ['ENOSPC', status.RESOURCE_EXHAUSTED],
      ['EDQUOT', status.RESOURCE_EXHAUSTED],
      ['EIO', status.UNAVAILABLE],
      ['EMFILE', status.UNAVAILABLE],
    ] as const) {
      const st = toStatus(fsError(code), log);
      assert.equal(st.code, expected, code);
      assert.match(st.details, new RegExp(`\\(${code}\\)`));
      assert.doesNotMatch(st.details, /\/srv\/dppa/);
    }
  });

  it('an event log whose last line was cut short takes new events on lines of their own', async () => {
    const folder = await mkdtemp(join(tmpdir(), 'dppa-torn-events-'));
    try {
      const first = new FileJobEvents(log);
      await first.load('j', folder);
      await first.append('j', { partyJoined: { party: 'a' } });
      await first.close();
      await appendFile(join(folder, 'events.jsonl'), '{"jobId":"j","seq":"2","partyJo');
      const second = new FileJobEvents(log);
      await second.load('j', folder);
      await second.append('j', { partyJoined: { party: 'b' } });
      await second.close();
      const third = new FileJobEvents(log);
      await third.load('j', folder);
      assert.deepEqual(
        third.recorded('j', 0n, 10).map((e) => [e.seq, e.partyJoined?.party]),
        [
          [1n, 'a'],
          [2n, 'b'],
        ],
      );
      await third.close();
    } finally {
      await rm(folder, { recursive: true, force: true });
    }
  });

  it('finds the code in a cause chain, and leaves other file system errors INTERNAL', () => {
    assert.equal(
      toStatus(new Error('writing a tensor failed', { cause: fsError('ENOSPC') }), log).code,
      status.RESOURCE_EXHAUSTED,
    );
    assert.equal(toStatus(fsError('EACCES'), log).code, status.INTERNAL);
  });
});
