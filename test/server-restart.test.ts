import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { ClientReadableStream } from '@grpc/grpc-js';
import { JobState, type JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { HealthCheckResponse_ServingStatus, type HealthCheckResponse } from '../proto/gen/grpc/health/v1/health.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  auth,
  call,
  pruneRecords,
  startHarness,
  upload,
  uploadMessages,
  watchAll,
  type Harness,
} from './fixtures/grpc-harness.js';

let dir: string;
let data: string;
let base: string;
let records: DeltaRecord[];
let h: Harness;
let jobId: string;
let tokens: Record<string, string>;

/** Records of the header and the first `n` tensors, and the begin and first chunk of tensor `n`. */
function firstTensors(n: number): { complete: DeltaRecord[]; half: DeltaRecord[] } {
  const begins = records.flatMap((r, i) => (r.tensorBegin !== undefined ? [i] : []));
  const complete = records.slice(0, begins[n]);
  const half = records.slice(begins[n], begins[n]! + 2);
  assert.ok(half[1]?.chunk !== undefined, 'tensor n has a chunk');
  return { complete, half };
}

async function until(what: string, test: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await test()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`timed out waiting until ${what}`);
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-restart-'));
  data = join(dir, 'data');
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 8 });
  base = fam.base;
  records = await pruneRecords({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.8 });
  // Uploads kept after the merge: the tests below merge them again.
  h = await startHarness(data, { shutdownGraceMs: 300, keepUploads: true });
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
  tokens = r.tokens;
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

describe('restart', () => {
  it('keeps completed tensors and drops a half-sent one; a stop is announced and ends watchers', async () => {
    const { complete, half } = firstTensors(2);
    await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', complete));
    // A second stream sends half of the next tensor and then stalls.
    const stalled = new Promise<unknown>((resolve) => {
      const s = h.uploads.upload(auth(tokens.a!), (err) => resolve(err));
      for (const m of uploadMessages(jobId, 'a', [records[0]!, ...half])) s.write(m);
    });
    const spoolDir = join(data, 'jobs', jobId, 'uploads', 'a');
    await until('the half tensor is being spooled', async () =>
      (await readdir(spoolDir)).some((f) => f.includes('.tmp-')),
    );

    const health = h.health.watch({ service: '' });
    const statuses: HealthCheckResponse_ServingStatus[] = [];
    health.on('data', (r: HealthCheckResponse) => statuses.push(r.status));
    const healthEnded = ended(health);
    const watcher = h.jobs.watchJob({ jobId, afterSeq: 0n }, auth(ADMIN));
    watcher.on('data', () => undefined);
    const watchEnded = ended(watcher);
    await until('the health watch has its first answer', () => Promise.resolve(statuses.length > 0));

    await h.close();
    assert.equal(
      ((await stalled) as { code?: number } | null)?.code !== undefined,
      true,
      'the stalled upload was cut off',
    );
    await watchEnded;
    await healthEnded;
    assert.deepEqual(statuses, [
      HealthCheckResponse_ServingStatus.SERVING,
      HealthCheckResponse_ServingStatus.NOT_SERVING,
    ]);

    // What a crash (SIGKILL) would leave: temporary spool and output files.
    await writeFile(join(spoolDir, '7.dppa.tmp-deadbeef'), 'partial');
    await writeFile(join(spoolDir, 'header.json.tmp-deadbeef'), '{');
    await mkdir(join(data, 'jobs', jobId, 'merged.tmp-deadbeef'));

    h = await startHarness(data, { shutdownGraceMs: 300, keepUploads: true });
    const s = await call(h.uploads, 'getUploadState', { jobId, party: 'a' }, tokens.a!);
    assert.equal(s.tensorsReceived.length, 2);
    assert.equal(s.complete, false);
    assert.deepEqual((await readdir(spoolDir)).sort(), ['0.dppa', '1.dppa', 'header.json']);
    assert.ok(!(await readdir(join(data, 'jobs', jobId))).some((f) => f.includes('.tmp-')));
  });

  it('resumes after the restart, merges, and a job found MERGING at start merges again', async () => {
    const held = new Set((await call(h.uploads, 'getUploadState', { jobId, party: 'a' }, tokens.a!)).tensorsReceived);
    const rest = records.filter((r, i) => {
      if (r.header !== undefined) return true;
      const begin = records
        .slice(0, i + 1)
        .filter((x) => x.tensorBegin !== undefined)
        .at(-1)!;
      return !held.has(begin.tensorBegin!.name);
    });
    assert.equal((await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', rest))).complete, true);
    const watched = watchAll(h.jobs, ADMIN, jobId);
    assert.equal((await upload(h.uploads, tokens.b!, uploadMessages(jobId, 'b', records))).complete, true);
    const events = await watched;
    assert.ok(events.at(-1)?.merged !== undefined);
    const first = await call(h.downloads, 'listFiles', { jobId }, ADMIN);

    // As if the server had been killed while merging: the job file says MERGING, the output and the last events are gone.
    await h.close();
    const jobDir = join(data, 'jobs', jobId);
    const stored = JSON.parse(await readFile(join(jobDir, 'job.json'), 'utf8')) as { state: string; merged?: unknown };
    stored.state = 'JOB_STATE_MERGING';
    delete stored.merged;
    await writeFile(join(jobDir, 'job.json'), JSON.stringify(stored));
    await rm(join(jobDir, 'merged'), { recursive: true });
    const kept = events.filter((e) => e.merged === undefined && e.stateChanged?.to !== JobState.JOB_STATE_MERGED);
    const lines = (await readFile(join(jobDir, 'events.jsonl'), 'utf8')).split('\n').slice(0, kept.length);
    await writeFile(join(jobDir, 'events.jsonl'), `${lines.join('\n')}\n`);
    const lastSeq = kept.at(-1)!.seq;

    h = await startHarness(data, { keepUploads: true });
    const again = await watchAll(h.jobs, ADMIN, jobId, lastSeq);
    assert.equal(again[0]?.seq, lastSeq + 1n, 'numbering goes on from the log');
    assert.ok(again.some((e: JobEvent) => e.stateChanged?.to === JobState.JOB_STATE_MERGED));
    assert.deepEqual(
      await call(h.downloads, 'listFiles', { jobId }, ADMIN),
      first,
      'the same checkpoint, byte for byte',
    );
  });

  it('a job found MERGING with a spooled tensor missing (killed between its drop and the move) sends that party back once', async () => {
    const r = await call(
      h.jobs,
      'createJob',
      {
        basePath: base,
        parties: ['a', 'b'],
        rate: 0.8,
        method: 'dp',
        label: 'crash',
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
    const id = r.job!.id;
    const watched = watchAll(h.jobs, ADMIN, id);
    for (const party of ['a', 'b'])
      assert.equal((await upload(h.uploads, r.tokens[party]!, uploadMessages(id, party, records))).complete, true);
    const merged = await watched;
    assert.ok(merged.at(-1)?.merged !== undefined);
    const first = await call(h.downloads, 'listFiles', { jobId: id }, ADMIN);

    await h.close();
    const jobDir = join(data, 'jobs', id);
    const stored = JSON.parse(await readFile(join(jobDir, 'job.json'), 'utf8')) as { state: string; merged?: unknown };
    stored.state = 'JOB_STATE_MERGING';
    delete stored.merged;
    await writeFile(join(jobDir, 'job.json'), JSON.stringify(stored));
    await rm(join(jobDir, 'merged'), { recursive: true });
    const kept = merged.filter((e) => e.merged === undefined && e.stateChanged?.to !== JobState.JOB_STATE_MERGED);
    const lines = (await readFile(join(jobDir, 'events.jsonl'), 'utf8')).split('\n').slice(0, kept.length);
    await writeFile(join(jobDir, 'events.jsonl'), `${lines.join('\n')}\n`);
    await rm(join(jobDir, 'uploads', 'b', '2.dppa'));

    h = await startHarness(data, { keepUploads: true });
    await until(
      'b is sent back',
      async () => (await call(h.jobs, 'getJob', { jobId: id }, ADMIN)).state === JobState.JOB_STATE_COLLECTING,
    );
    const shown = await call(h.jobs, 'getJob', { jobId: id }, ADMIN);
    assert.equal(shown.parties[0]!.stoppedReason, '');
    assert.match(
      shown.parties[1]!.stoppedReason,
      /^tensor "[^"]+" of its upload cannot be used \(\S+\/uploads\/b\/2\.dppa, tensor "[^"]+": the spool file is gone\); it was discarded/,
    );
    const held = new Set(
      (await call(h.uploads, 'getUploadState', { jobId: id, party: 'b' }, r.tokens.b!)).tensorsReceived,
    );
    const missing = records.filter((rec, i) => {
      if (rec.header !== undefined) return true;
      const begin = records
        .slice(0, i + 1)
        .filter((x) => x.tensorBegin !== undefined)
        .at(-1)!;
      return !held.has(begin.tensorBegin!.name);
    });
    const events = watchAll(h.jobs, ADMIN, id, kept.at(-1)!.seq);
    assert.equal((await upload(h.uploads, r.tokens.b!, uploadMessages(id, 'b', missing))).complete, true);
    const all = await events;
    assert.ok(all.at(-1)?.merged !== undefined);
    assert.equal(all.filter((e) => e.partyStopped !== undefined).length, 1);
    assert.deepEqual(
      await call(h.downloads, 'listFiles', { jobId: id }, ADMIN),
      first,
      'the same checkpoint, byte for byte',
    );
  });
});

describe('restart without --keep-uploads', () => {
  it('deletes the uploads of a job that merged while they were kept, and shows the job as before', async () => {
    const shown = await call(h.jobs, 'getJob', { jobId }, ADMIN);
    assert.equal(shown.state, JobState.JOB_STATE_MERGED);
    await h.close();
    h = await startHarness(data);
    for (const party of ['a', 'b']) {
      assert.deepEqual(
        (await readdir(join(data, 'jobs', jobId, 'uploads', party))).sort(),
        ['discarded.json', 'header.json'],
        party,
      );
    }
    assert.deepEqual(await call(h.jobs, 'getJob', { jobId }, ADMIN), shown);
  });
});

/** Resolves when a server stream ends, by its end or by an error status. */
function ended(stream: ClientReadableStream<unknown>): Promise<void> {
  return new Promise((resolve) => {
    stream.on('error', () => resolve());
    stream.on('end', () => resolve());
  });
}
