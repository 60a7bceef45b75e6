import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  type ClientDuplexStream,
  credentials,
  loadPackageDefinition,
  type ServiceClientConstructor,
  status,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { JobState, type CreateJobResponse, type Job, type PartyStatus } from '../proto/gen/dppa/v1/jobs.js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { HealthCheckResponse_ServingStatus } from '../proto/gen/grpc/health/v1/health.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { assembleTensor, chunkChecksum, crc32c, foldChunkCrc } from '../proto/sparse/index.js';
import { roundBf16 } from './fixtures/reference.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  auth,
  call,
  downloadChunks,
  pruneRecords,
  rejectsWith,
  startHarness,
  upload,
  uploadMessages,
  watchAll,
  type Harness,
} from './fixtures/grpc-harness.js';

let dir: string;
let base: string;
let fts: string[];
let h: Harness;
/** Records of each party's delta, as uploaded. */
const deltas = new Map<string, DeltaRecord[]>();
const FACTORS = { math: [1.5, 0.75], law: [2, 1] };
const WEIGHTS = { math: 1, law: 0.5 };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-merge-'));
  // Sharded, so that the output must mirror a multi-file layout and index.
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 21, finetunes: 2, shardBytes: 8000 });
  base = fam.base;
  fts = fam.finetuned;
  deltas.set('math', await pruneRecords({ base, finetuned: fts[0]!, rate: 0.8 }));
  deltas.set('law', await pruneRecords({ base, finetuned: fts[1]!, rate: 0.8 }));
  h = await startHarness(join(dir, 'data'));
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** Creates the test's job (math and law, fixed factors, weights); `extra` overrides request fields. */
function create(token: string, parties = ['math', 'law'], extra: object = {}): Promise<CreateJobResponse> {
  const two = parties.length === 2;
  return call(
    h.jobs,
    'createJob',
    {
      basePath: base,
      parties,
      rate: 0.8,
      method: 'dp',
      label: 'test',
      dpa: two
        ? {
            fixed: { factors: [1, 1], perParty: { math: { factors: FACTORS.math }, law: { factors: FACTORS.law } } },
            scaleOutsideByMax: false,
          }
        : undefined,
      merge: two ? { weights: WEIGHTS, signElection: false, partiesMayDownload: true, output: 0 } : undefined,
      maxAbsValue: 0,
      pruneMethod: 0,
      privacy: 0,
      threshold: 0,
      clipBound: 0,
      securePhaseSeconds: 0,
      ...extra,
    },
    token,
  );
}

/** The header record and the records of one tensor. */
function onlyTensor(records: DeltaRecord[], tensor: string): DeltaRecord[] {
  let current = '';
  return records.filter((rec) => {
    if (rec.tensorBegin !== undefined) current = rec.tensorBegin.name;
    return rec.header !== undefined || current === tensor;
  });
}

function esc(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
}

/** The job once `ready` holds for it (polled: no deadline, the test runner's timeout is the limit). */
async function waitFor(jobId: string, ready: (j: Job) => boolean): Promise<Job> {
  for (;;) {
    const j = await call(h.jobs, 'getJob', { jobId }, ADMIN);
    if (ready(j)) return j;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** base + Σ_i c_i f_ip Δ_ip in fp32, parties in job order, rounded to bf16: computed here from the decoded records. */
async function expectedBf16(name: string): Promise<Uint16Array> {
  const b = await Checkpoint.open(base);
  const acc = Float32Array.from(await b.readF32(name));
  await b.close();
  for (const party of ['math', 'law'] as const) {
    const records = deltas.get(party)!;
    const start = records.findIndex((r) => r.tensorBegin?.name === name);
    if (start < 0) continue;
    const end = records.findIndex((r, i) => i > start && r.tensorEnd !== undefined);
    const t = assembleTensor(records.slice(start, end + 1));
    t.partitions.forEach((entries, p) => {
      const scale = WEIGHTS[party] * (p === 0 ? 1 : FACTORS[party][p - 1]!);
      entries.positions.forEach((pos, i) => (acc[pos] = acc[pos]! + scale * entries.values[i]!));
    });
  }
  return Uint16Array.from(acc, (x) => new Uint32Array(new Float32Array([roundBf16(x)]).buffer)[0]! >>> 16);
}

describe('aggregation server: job, uploads, merge, download', () => {
  let job: Job;
  let tokens: Record<string, string>;

  it('creates a job for the admin only', async () => {
    await rejectsWith(create('not-a-token'), status.UNAUTHENTICATED, /unknown token/);
    const r = await create(ADMIN);
    job = r.job!;
    tokens = r.tokens;
    assert.equal(job.state, JobState.JOB_STATE_COLLECTING);
    assert.match(job.baseFingerprint, /^fp1:sha256:[0-9a-f]{64}$/);
    assert.deepEqual(Object.keys(tokens).sort(), ['law', 'math']);
    assert.match(tokens.math!, /^[A-Za-z0-9_-]{43}$/);
    // A party token is not an admin token.
    await rejectsWith(create(tokens.math!), status.PERMISSION_DENIED);
    await rejectsWith(call(h.jobs, 'listJobs', {}, tokens.math!), status.PERMISSION_DENIED);
    const listed = await call(h.jobs, 'listJobs', {}, ADMIN);
    assert.deepEqual(
      listed.jobs.map((j) => j.id),
      [job.id],
    );
  });

  it('rejects bad job settings with the field named', async () => {
    await rejectsWith(create(ADMIN, ['math', 'math']), status.INVALID_ARGUMENT, /parties: "math" appears twice/);
    await rejectsWith(create(ADMIN, ['no/slash']), status.INVALID_ARGUMENT, /parties/);
    await rejectsWith(create(ADMIN, ['math'], { rate: 1 }), status.INVALID_ARGUMENT, /rate/);
    await rejectsWith(
      create(ADMIN, ['math'], { basePath: join(dir, 'nowhere') }),
      status.INVALID_ARGUMENT,
      /base_path: .* does not exist/,
    );
    const search = {
      method: 0,
      tuner: 0,
      start: 0,
      step: 0,
      upper: 0,
      lower: 0,
      budget: 0,
      downward: false,
      evaluator: 0,
      onnx: undefined,
      partyEvaluator: {},
      partyTimeoutSeconds: 0,
    };
    await rejectsWith(
      create(ADMIN, ['math'], {
        dpa: { search: { ...search, partyEvaluator: { nobody: 1 } }, scaleOutsideByMax: false },
      }),
      status.INVALID_ARGUMENT,
      /^dpa\.search\.party_evaluator: "nobody" is not a party of the job$/,
    );
    await rejectsWith(
      create(ADMIN, ['math'], { dpa: { search: { ...search, evaluator: 2 }, scaleOutsideByMax: false } }),
      status.INVALID_ARGUMENT,
      /^dpa\.search\.onnx: required, since the evaluator of math is ONNX$/,
    );
    await rejectsWith(
      create(ADMIN, ['math'], { merge: { weights: {}, signElection: true, partiesMayDownload: false, output: 0 } }),
      status.UNIMPLEMENTED,
    );
    assert.equal((await call(h.jobs, 'listJobs', {}, ADMIN)).jobs.length, 1, 'no job was created');
  });

  it('takes both uploads, merges, and the result equals an independent fp32 computation', async () => {
    const watched = watchAll(h.jobs, tokens.math!, job.id);
    const [math, law] = await Promise.all([
      upload(h.uploads, tokens.math!, uploadMessages(job.id, 'math', deltas.get('math')!)),
      upload(h.uploads, tokens.law!, uploadMessages(job.id, 'law', deltas.get('law')!)),
    ]);
    assert.equal(math.complete, true);
    assert.equal(law.complete, true);
    assert.equal(math.tensorsExpected, math.tensorsReceived.length);
    const events = await watched;
    const kinds = events.map((e) =>
      Object.keys(e).find((k) => !['jobId', 'seq', 'time'].includes(k) && e[k as keyof typeof e] !== undefined),
    );
    assert.deepEqual(
      events.map((e) => e.seq),
      events.map((_e, i) => BigInt(i + 1)),
      'seq counts from 1',
    );
    for (const k of ['partyJoined', 'uploadProgress', 'uploadComplete', 'stateChanged', 'mergeProgress', 'merged'])
      assert.ok(kinds.includes(k), k);
    assert.equal(kinds.at(-1), 'merged');
    const merged = await call(h.jobs, 'getJob', { jobId: job.id }, tokens.law!);
    assert.equal(merged.state, JobState.JOB_STATE_MERGED);
    assert.deepEqual(
      merged.parties.map((p) => [p.name, p.uploadComplete, p.factors]),
      [
        ['math', true, FACTORS.math],
        ['law', true, FACTORS.law],
      ],
    );

    const out = await Checkpoint.open(join(dir, 'data', 'jobs', job.id, 'merged'));
    const b = await Checkpoint.open(base);
    try {
      assert.deepEqual(
        out.layout.files.map((f) => f.fileName),
        b.layout.files.map((f) => f.fileName),
      );
      assert.ok(b.layout.files.length > 1, 'the fixture is sharded');
      for (const info of b.tensors()) {
        const got = await out.readRaw(info.name);
        assert.deepEqual(
          new Uint16Array(got.buffer, got.byteOffset, got.length / 2),
          await expectedBf16(info.name),
          info.name,
        );
      }
    } finally {
      await Promise.all([out.close(), b.close()]);
    }
    const names = await readdir(join(dir, 'data', 'jobs', job.id, 'merged'));
    assert.ok(
      names.includes('config.json') &&
        names.includes('tokenizer.json') &&
        names.includes('model.safetensors.index.json'),
    );

    // Once merged, the uploaded tensors are deleted (the header and a list of them stay), and the job
    // shows what each party sent as before.
    const spool = join(dir, 'data', 'jobs', job.id, 'uploads', 'math');
    for (let i = 0; i < 100 && (await readdir(spool)).some((f) => f.endsWith('.dppa')); i++)
      await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual((await readdir(spool)).sort(), ['discarded.json', 'header.json']);
    assert.deepEqual(
      merged.parties.map((p) => p.tensorsReceived),
      [math.tensorsReceived.length, law.tensorsReceived.length],
    );
    assert.ok(merged.parties.every((p) => p.bytesReceived > 0n));
    assert.deepEqual(await call(h.jobs, 'getJob', { jobId: job.id }, tokens.law!), merged);
    assert.match(
      await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text(),
      /^dppa_spool_bytes 0$/m,
    );
  });

  it('refuses a chunk whose position stream is malformed under a valid CRC at upload, keeps the rest, and merges once it is sent right', async () => {
    const r = await create(ADMIN, ['math']);
    const good = deltas.get('math')!;
    const records = structuredClone(good);
    const at = records.findIndex((rec) => rec.chunk !== undefined && rec.chunk.positions.length > 0);
    const chunk = records[at]!.chunk!;
    // Bytes after the last gap: only decoding every position tells.
    chunk.positions = Buffer.concat([chunk.positions, Buffer.of(0xff)]);
    chunk.crc32c = chunkChecksum(chunk);
    const end = records.findIndex((rec, i) => i > at && rec.tensorEnd !== undefined);
    let begin = at;
    while (records[begin]!.tensorBegin === undefined) begin--;
    let list = 0;
    for (let i = begin + 1; i < end; i++) list = foldChunkCrc(list, records[i]!.chunk!.crc32c);
    records[end]!.tensorEnd!.crc32c = list;
    const name = chunk.tensor.replaceAll('.', '\\.');
    await rejectsWith(
      upload(h.uploads, r.tokens.math!, uploadMessages(r.job!.id, 'math', records)),
      status.INVALID_ARGUMENT,
      new RegExp(`tensor "${name}": chunk ${chunk.index}: .*data after`),
    );
    const held = await call(h.uploads, 'getUploadState', { jobId: r.job!.id, party: 'math' }, r.tokens.math!);
    const before = records
      .slice(0, begin)
      .filter((rec) => rec.tensorEnd !== undefined)
      .map((rec) => rec.tensorEnd!.name);
    assert.deepEqual(held.tensorsReceived, before, 'the tensors before the bad one are held, the bad one is not');
    const state = await upload(h.uploads, r.tokens.math!, uploadMessages(r.job!.id, 'math', good));
    assert.equal(state.complete, true);
    const events = await watchAll(h.jobs, ADMIN, r.job!.id);
    assert.ok(events.at(-1)?.merged !== undefined, 'the job merged');
  });

  it('sends a party whose spooled tensor is unusable at merge back to collecting, keeps the other, and merges the same bytes once it sent it again', async () => {
    const r = await create(ADMIN);
    const id = r.job!.id;
    // A spool file damaged on disk after its upload was accepted (a value byte: the chunk CRC no longer matches).
    const damage = async (party: string, tensor: string): Promise<void> => {
      const index = deltas.get(party)![0]!.header!.tensors.findIndex((t) => t.name === tensor);
      const file = join(dir, 'data', 'jobs', id, 'uploads', party, `${index}.dppa`);
      const bytes = await readFile(file);
      const middle = Math.floor(bytes.length * 0.6);
      bytes[middle] = bytes[middle]! ^ 0x55;
      await writeFile(file, bytes);
    };
    const damagedTensor = {
      math: 'model.layers.0.mlp.up_proj.weight',
      law: 'model.layers.1.mlp.down_proj.weight',
    } as Record<string, string>;
    assert.equal(
      (await upload(h.uploads, r.tokens.math!, uploadMessages(id, 'math', deltas.get('math')!))).complete,
      true,
    );
    await damage('math', damagedTensor.math!);
    assert.equal(
      (await upload(h.uploads, r.tokens.law!, uploadMessages(id, 'law', deltas.get('law')!))).complete,
      true,
    );

    // Each merge stops at the first unusable tensor: math goes back to collecting; law is damaged while it does.
    const stopped = new Map<string, string>();
    for (const party of ['math', 'law']) {
      // The job goes back to COLLECTING first, then the tensor is dropped.
      const isBack = (p: PartyStatus): boolean => p.name === party && p.stoppedReason !== '' && !p.uploadComplete;
      const back = await waitFor(id, (j) => j.state === JobState.JOB_STATE_COLLECTING && j.parties.some(isBack));
      const status = back.parties.find(isBack)!;
      const other = back.parties.find((p) => p.name !== party)!;
      const tensor = damagedTensor[party]!;
      const spoolFile = `${join(dir, 'data', 'jobs', id, 'uploads', party)}/`;
      assert.match(
        status.stoppedReason,
        new RegExp(
          `^tensor "${esc(tensor)}" of its upload cannot be used \\(${esc(spoolFile)}\\d+\\.dppa, tensor "${esc(tensor)}": .+\\); it was discarded: push again to send it$`,
        ),
      );
      assert.match(status.stoppedReason, /CRC-32C|checksum/i);
      assert.equal(status.tensorsReceived, status.tensorsExpected - 1, 'only the unusable tensor is discarded');
      assert.equal(other.uploadComplete, true, `${other.name} keeps its upload`);
      const state = await call(h.uploads, 'getUploadState', { jobId: id, party }, r.tokens[party]!);
      assert.ok(!state.tensorsReceived.includes(tensor));
      stopped.set(party, status.stoppedReason);
      if (party === 'math') await damage('law', damagedTensor.law!);
      // The party pushes again, as the SDK does: the header, then only the tensor the server no longer holds.
      assert.equal(
        (await upload(h.uploads, r.tokens[party]!, uploadMessages(id, party, onlyTensor(deltas.get(party)!, tensor))))
          .complete,
        true,
      );
    }
    const events = await watchAll(h.jobs, ADMIN, id);
    assert.ok(events.at(-1)?.merged !== undefined, 'the job merged');
    const stops = events.filter((e) => e.partyStopped !== undefined).map((e) => e.partyStopped!);
    assert.deepEqual(stops.map((e) => [e.party, e.reason, e.discardedTensors]).sort(), [
      ['law', stopped.get('law'), [damagedTensor.law]],
      ['math', stopped.get('math'), [damagedTensor.math]],
    ]);
    const moves = events
      .filter((e) => e.stateChanged !== undefined)
      .map((e) => `${e.stateChanged!.from}>${e.stateChanged!.to}`);
    assert.deepEqual(moves, ['1>3', '3>1', '1>3', '3>1', '1>3', '3>4']);
    const merged = await call(h.jobs, 'getJob', { jobId: id }, ADMIN);
    assert.deepEqual(
      merged.parties.map((p) => p.stoppedReason),
      ['', ''],
      'cleared once every upload is in',
    );
    // The same inputs as the undisturbed job above: the same bytes.
    const files = async (jobId: string): Promise<string[]> =>
      (await call(h.downloads, 'listFiles', { jobId }, ADMIN)).files.map((f) => `${f.path} ${f.sha256}`);
    assert.deepEqual(await files(id), await files(job.id));
  });

  it('lists files and downloads them, resuming from an offset, with matching CRC-32C and SHA-256', async () => {
    const { files } = await call(h.downloads, 'listFiles', { jobId: job.id }, tokens.math!);
    assert.ok(files.length >= 4);
    for (const f of files) {
      const whole = await downloadChunks(h.downloads, ADMIN, job.id, f.path);
      for (const c of whole) {
        assert.ok(c.data.length <= 1024 * 1024);
        assert.equal(c.crc32c, crc32c(c.data));
      }
      const bytes = Buffer.concat(whole.map((c) => c.data));
      assert.equal(BigInt(bytes.length), f.size);
      assert.equal(createHash('sha256').update(bytes).digest('hex'), f.sha256);
      const from = f.size / 3n;
      const rest = await downloadChunks(h.downloads, tokens.law!, job.id, f.path, from);
      assert.equal(rest[0]?.offset ?? f.size, from);
      assert.deepEqual(Buffer.concat([bytes.subarray(0, Number(from)), ...rest.map((c) => c.data)]), bytes);
    }
    await rejectsWith(downloadChunks(h.downloads, ADMIN, job.id, '../job.json'), status.NOT_FOUND);
    await rejectsWith(
      downloadChunks(h.downloads, ADMIN, job.id, files[0]!.path, files[0]!.size + 1n),
      status.OUT_OF_RANGE,
    );
  });

  it('refuses downloads before the merge and to parties of a job that does not allow them', async () => {
    const other = await call(
      h.jobs,
      'createJob',
      {
        basePath: base,
        parties: ['solo'],
        rate: 0.8,
        method: '',
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
    await rejectsWith(
      call(h.downloads, 'listFiles', { jobId: other.job!.id }, ADMIN),
      status.FAILED_PRECONDITION,
      /COLLECTING/,
    );
    await rejectsWith(
      call(h.downloads, 'listFiles', { jobId: other.job!.id }, other.tokens.solo!),
      status.PERMISSION_DENIED,
      /parties_may_download/,
    );
    await rejectsWith(call(h.jobs, 'getJob', { jobId: job.id }, other.tokens.solo!), status.PERMISSION_DENIED);
    const cancelled = await call(h.jobs, 'cancelJob', { jobId: other.job!.id, reason: 'testing cancel' }, ADMIN);
    assert.equal(cancelled.state, JobState.JOB_STATE_FAILED);
    assert.equal(cancelled.failureReason, 'testing cancel');
    const events = await watchAll(h.jobs, ADMIN, other.job!.id);
    assert.deepEqual(events.at(-1)?.failed, { reason: 'testing cancel' });
    await rejectsWith(
      call(h.jobs, 'cancelJob', { jobId: job.id, reason: '' }, ADMIN),
      status.FAILED_PRECONDITION,
      /already merged/,
    );
    // A watch the caller cancels releases its subscription too.
    const open = await create(ADMIN);
    const live = h.jobs.watchJob({ jobId: open.job!.id, afterSeq: 0n }, auth(ADMIN));
    live.on('error', () => undefined);
    for (let i = 0; i < 100 && h.server.events.watcherCount === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(h.server.events.watcherCount, 1);
    live.cancel();
    for (let i = 0; i < 100 && h.server.events.watcherCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(h.server.events.watcherCount, 0, 'no watcher left subscribed');
  });

  it('describes its services through server reflection, as grpcurl uses it', async () => {
    const root = new URL('../node_modules/@grpc/reflection/build/proto/', import.meta.url).pathname;
    const pkg = loadSync(`${root}grpc/reflection/v1/reflection.proto`, { includeDirs: [root] });
    const Reflection = (
      loadPackageDefinition(pkg) as unknown as {
        grpc: { reflection: { v1: { ServerReflection: ServiceClientConstructor } } };
      }
    ).grpc.reflection.v1.ServerReflection;
    const client = new Reflection(h.address, credentials.createInsecure());
    try {
      const services = await new Promise<string[]>((resolve, reject) => {
        const stream = (
          client as unknown as {
            serverReflectionInfo(): ClientDuplexStream<
              object,
              { listServicesResponse?: { service: { name: string }[] } }
            >;
          }
        ).serverReflectionInfo();
        stream.on('data', (r: { listServicesResponse?: { service: { name: string }[] } }) => {
          resolve(r.listServicesResponse?.service.map((s) => s.name) ?? []);
          stream.end();
        });
        stream.on('error', reject);
        stream.write({ listServices: '' });
      });
      for (const s of [
        'dppa.v1.JobService',
        'dppa.v1.UploadService',
        'dppa.v1.DownloadService',
        'grpc.health.v1.Health',
      ])
        assert.ok(services.includes(s), s);
    } finally {
      client.close();
    }
  });

  it('answers health checks and serves metrics that moved', async () => {
    const check = (service: string): Promise<{ status: HealthCheckResponse_ServingStatus }> =>
      new Promise((resolve, reject) =>
        h.health.check({ service }, (err, res) => (err === null ? resolve(res) : reject(err))),
      );
    assert.equal((await check('')).status, HealthCheckResponse_ServingStatus.SERVING);
    assert.equal((await check('dppa.v1.UploadService')).status, HealthCheckResponse_ServingStatus.SERVING);
    await rejectsWith(check('no.such.Service'), status.NOT_FOUND);

    const res = await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`);
    assert.equal(res.status, 200);
    const text = await res.text();
    const samples = new Map<string, number>();
    for (const line of text.split('\n')) {
      if (line === '' || line.startsWith('#')) continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$/.exec(line);
      assert.ok(m !== null, `not an exposition line: ${line}`);
      samples.set(m[1]!, Number(m[2]));
    }
    assert.ok(samples.get('dppa_upload_tensors_total')! > 0);
    assert.ok(samples.get('dppa_upload_bytes_total')! > 0);
    assert.ok(samples.get('dppa_merge_tensors_total')! > 0);
    assert.ok(samples.get('dppa_merge_bytes_total')! > 0);
    assert.equal(
      samples.get('dppa_jobs{state="MERGED"}'),
      3,
      'the main job, the one whose bad chunk was sent again and the one whose parties sent damaged tensors again',
    );
    assert.equal(samples.get('dppa_uploads_active'), 0);
    assert.ok(
      samples.get(
        'grpc_server_handled_total{grpc_type="client_stream",grpc_service="dppa.v1.UploadService",grpc_method="Upload",grpc_code="OK"}',
      )! >= 2,
    );
    assert.ok(
      samples.get(
        'grpc_server_handled_total{grpc_type="unary",grpc_service="dppa.v1.JobService",grpc_method="CreateJob",grpc_code="PermissionDenied"}',
      )! >= 1,
    );
    assert.ok(samples.get('dppa_merge_duration_seconds_count')! >= 1);
    assert.ok(samples.has('process_cpu_user_seconds_total'));
    assert.ok(
      [...samples.keys()].every((k) => !k.includes('party') && !k.includes('tensor=')),
      'no per-party or per-tensor labels',
    );
  });

  it('shows a merged job and its uploads the same after a restart, the uploaded tensors deleted', async () => {
    const shown = await call(h.jobs, 'getJob', { jobId: job.id }, ADMIN);
    const state = await call(h.uploads, 'getUploadState', { jobId: job.id, party: 'math' }, tokens.math!);
    assert.ok(state.complete && state.tensorsReceived.length > 0);
    await h.close();
    h = await startHarness(join(dir, 'data'));
    assert.deepEqual(await call(h.jobs, 'getJob', { jobId: job.id }, ADMIN), shown);
    assert.deepEqual(await call(h.uploads, 'getUploadState', { jobId: job.id, party: 'math' }, tokens.math!), state);
    assert.deepEqual((await readdir(join(dir, 'data', 'jobs', job.id, 'uploads', 'math'))).sort(), [
      'discarded.json',
      'header.json',
    ]);
  });
});
