import assert from 'node:assert/strict';
import { cp, mkdtemp, readdir, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Client, credentials, status } from '@grpc/grpc-js';
import { JobState } from '../proto/gen/dppa/v1/jobs.js';
import { PruneMethod } from '../proto/gen/dppa/v1/algorithm.js';
import { DeltaRecord, ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { DppaClient } from '../client/index.js';
import { UploadRequest, type UploadState } from '../proto/gen/dppa/v1/upload.js';
import { decodeChunk, encodeChunks, tensorRecords } from '../proto/sparse/index.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  auth,
  call,
  createJobRequest,
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
let finetuned: string;
let records: DeltaRecord[];
let otherBaseRecords: DeltaRecord[];
let h: Harness;
let jobId: string;
let tokens: Record<string, string>;

/** A deep copy of the records, to damage one without touching the others. */
function copy(rs: readonly DeltaRecord[]): DeltaRecord[] {
  return rs.map((r) => DeltaRecord.decode(DeltaRecord.encode(r).finish()));
}

/** Indices of the records of the k-th tensor (0-based): its begin up to its end. */
function tensorSpan(rs: readonly DeltaRecord[], k: number): [number, number] {
  const begins = rs.flatMap((r, i) => (r.tensorBegin !== undefined ? [i] : []));
  const start = begins[k]!;
  return [start, rs.findIndex((r, i) => i > start && r.tensorEnd !== undefined)];
}

const header = (): DeltaRecord => copy([records[0]!])[0]!;
const tensor = (k: number, rs = records): DeltaRecord[] => {
  const [s, e] = tensorSpan(rs, k);
  return rs.slice(s, e + 1);
};

function state(party = 'a'): Promise<UploadState> {
  return call(h.uploads, 'getUploadState', { jobId, party }, tokens[party]!);
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-upload-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 5 });
  finetuned = fam.finetuned[0]!;
  const other = await writeLlamaFamily(join(dir, 'other'), { shape: TINY, seed: 6 });
  base = fam.base;
  records = await pruneRecords({ base, finetuned: fam.finetuned[0]!, rate: 0.9, method: 'magnitude' });
  otherBaseRecords = await pruneRecords({
    base: other.base,
    finetuned: other.finetuned[0]!,
    rate: 0.9,
    method: 'magnitude',
  });
  h = await startHarness(join(dir, 'data'));
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
  jobId = r.job!.id;
  tokens = r.tokens;
  // Party a holds its header and first two tensors: the state every bad call below must leave as it is.
  await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', [header(), ...tensor(0), ...tensor(1)]));
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

describe('uploads: every bad input gets its status and changes nothing', () => {
  let before: UploadState;
  const unchanged = async (): Promise<void> => {
    assert.deepEqual(await state(), before);
    const files = await readdir(join(dir, 'data', 'jobs', jobId, 'uploads', 'a'));
    assert.deepEqual(
      files.filter((f) => f.includes('.tmp-')),
      [],
      'no temporary spool file left',
    );
    assert.equal(files.filter((f) => f.endsWith('.dppa')).length, 2);
  };
  const open = (party = 'a'): UploadRequest => ({ open: { jobId, party } });

  it('holds the first two tensors', async () => {
    before = await state();
    assert.equal(before.tensorsReceived.length, 2);
    assert.ok(before.tensorsExpected > 2);
    assert.equal(before.complete, false);
    assert.ok(before.bytesReceived > 0n);
  });

  it('UNAUTHENTICATED without a token or with an unknown one', async () => {
    await rejectsWith(
      new Promise((resolve, reject) => {
        const s = h.uploads.upload((err, res) => (err === null ? resolve(res) : reject(err)));
        s.write(open());
        s.end();
      }),
      status.UNAUTHENTICATED,
      /missing credentials/,
    );
    await rejectsWith(upload(h.uploads, 'forged', [open(), { record: header() }]), status.UNAUTHENTICATED);
    await unchanged();
  });

  it("PERMISSION_DENIED with another party's token or another job's", async () => {
    await rejectsWith(
      upload(h.uploads, tokens.b!, [open('a'), { record: header() }, ...tensor(2).map((record) => ({ record }))]),
      status.PERMISSION_DENIED,
    );
    await rejectsWith(call(h.uploads, 'getUploadState', { jobId, party: 'a' }, tokens.b!), status.PERMISSION_DENIED);
    await rejectsWith(call(h.uploads, 'getUploadState', { jobId, party: 'a' }, ADMIN), status.PERMISSION_DENIED);
    const other = await call(
      h.jobs,
      'createJob',
      createJobRequest({ basePath: base, parties: ['a'], method: 'magnitude' }),
      ADMIN,
    );
    await rejectsWith(upload(h.uploads, other.tokens.a!, [open('a'), { record: header() }]), status.PERMISSION_DENIED);
    await unchanged();
  });

  it('FAILED_PRECONDITION for a delta made against another base, naming both fingerprints', async () => {
    const hdr = header();
    const err = await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: otherBaseRecords[0]! }]),
      status.FAILED_PRECONDITION,
    );
    assert.ok(
      err.details.includes(otherBaseRecords[0]!.header!.baseFingerprint) &&
        err.details.includes(hdr.header!.baseFingerprint),
      err.details,
    );
    hdr.header!.method = 'dp';
    hdr.header!.pruneMethod = PruneMethod.PRUNE_METHOD_DP;
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: hdr }]),
      status.FAILED_PRECONDITION,
      /method "dp".*requires "magnitude"/,
    );
    await unchanged();
  });

  it('INVALID_ARGUMENT for an unknown tensor or a wrong shape, naming the tensor and the expected shape', async () => {
    const unknown = header();
    unknown.header!.tensors.push({ ...unknown.header!.tensors[0]!, name: 'model.bogus.weight' });
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: unknown }]),
      status.INVALID_ARGUMENT,
      /model\.bogus\.weight.*not in the base/,
    );
    const shaped = header();
    shaped.header!.tensors[0]!.shape = [7n, 7n];
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: shaped }]),
      status.INVALID_ARGUMENT,
      /model\.embed_tokens\.weight.*\[7, 7\].*base has \[40, 32\]/,
    );
    const levels = header();
    levels.header!.levels = [0.9, 0.95];
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: levels }]),
      status.INVALID_ARGUMENT,
      /levels: must decrease/,
    );
    // A begin whose shape differs from the plan.
    const [begin, ...rest] = copy(tensor(2));
    begin!.tensorBegin!.shape = [1n];
    await rejectsWith(
      upload(h.uploads, tokens.a!, [
        open(),
        { record: header() },
        { record: begin! },
        ...rest.map((record) => ({ record })),
      ]),
      status.INVALID_ARGUMENT,
      /shape \[1\].*base has/,
    );
    await unchanged();
  });

  it('DATA_LOSS for a damaged chunk, naming the tensor and the chunk; the partial tensor is discarded', async () => {
    const bad = copy(tensor(2));
    const chunk = bad.find((r) => r.chunk !== undefined)!.chunk!;
    chunk.values[0] = chunk.values[0]! ^ 0xff;
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: header() }, ...bad.map((record) => ({ record }))]),
      status.DATA_LOSS,
      new RegExp(`${chunk.tensor.replaceAll('.', '\\.')}.*chunk 0: CRC-32C mismatch`),
    );
    await unchanged();
  });

  it('INVALID_ARGUMENT for a position outside the tensor, a broken record order, a stream cut inside a tensor', async () => {
    const [begin, , ...others] = tensor(2);
    const name = begin!.tensorBegin!.name;
    const numel = begin!.tensorBegin!.shape.reduce((a, b) => a * b, 1n);
    const outside = [...encodeChunks(name, 1, Float64Array.of(Number(numel)), Float32Array.of(0.5))].map((c) => ({
      chunk: c,
    }));
    await rejectsWith(
      upload(h.uploads, tokens.a!, [
        open(),
        { record: header() },
        { record: begin! },
        ...outside.map((record) => ({ record })),
        ...others.map((record) => ({ record })),
      ]),
      status.INVALID_ARGUMENT,
      /outside the tensor/,
    );
    await rejectsWith(
      upload(h.uploads, tokens.a!, [
        open(),
        { record: header() },
        ...tensor(2)
          .slice(0, -1)
          .map((record) => ({ record })),
      ]),
      status.INVALID_ARGUMENT,
      /ended inside tensor/,
    );
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), ...tensor(2).map((record) => ({ record }))]),
      status.INVALID_ARGUMENT,
      /start with a DeltaHeader/,
    );
    await rejectsWith(
      upload(h.uploads, tokens.a!, [{ record: header() }]),
      status.INVALID_ARGUMENT,
      /first message .* UploadOpen/,
    );
    // A tensor the header does not plan (a complete, valid record sequence of its own).
    const unplanned = [
      ...tensorRecords('model.extra.weight', [4], [{ positions: Float64Array.of(1), values: Float32Array.of(0.25) }]),
    ];
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: header() }, ...unplanned.map((record) => ({ record }))]),
      status.INVALID_ARGUMENT,
      /model\.extra\.weight.*not planned/,
    );
    await unchanged();
  });

  it('RESOURCE_EXHAUSTED for a message over 8 MiB; a retry at once is taken in', async () => {
    const [begin] = tensor(2);
    const huge: DeltaRecord = { chunk: { ...tensor(2)[1]!.chunk!, values: Buffer.alloc(9 * 1024 * 1024) } };
    await rejectsWith(
      upload(h.uploads, tokens.a!, [open(), { record: header() }, { record: begin! }, { record: huge }]),
      status.RESOURCE_EXHAUSTED,
    );
    // grpc-js sends this status itself, before the handler learns of it: the retry takes the slot over rather than getting ALREADY_EXISTS.
    assert.deepEqual(await upload(h.uploads, tokens.a!, [open(), { record: header() }]), before);
    assert.equal(await uploadsActive(), 0);
    await unchanged();
  });

  it('INVALID_ARGUMENT for a message that does not decode, the slot released before the status', async () => {
    const raw = new Client(h.address, credentials.createInsecure());
    try {
      const sendRaw = (messages: Buffer[]): Promise<unknown> =>
        new Promise((resolve, reject) => {
          const stream = raw.makeClientStreamRequest(
            '/dppa.v1.UploadService/Upload',
            (b: Buffer) => b,
            (b: Buffer) => b,
            auth(tokens.a!),
            (err, res) => (err === null ? resolve(res) : reject(err)),
          );
          for (const m of messages) stream.write(m);
          stream.end();
        });
      const openBytes = Buffer.from(UploadRequest.encode(open()).finish());
      // Field 2 (record) announcing 100 bytes that are not there.
      const e = await rejectsWith(
        sendRaw([openBytes, Buffer.from([0x12, 100, 1, 2])]),
        status.INVALID_ARGUMENT,
        /does not decode/,
      );
      assert.doesNotMatch(e.details, /at .*\.ts:\d+/, 'no stack trace');
      assert.equal(await uploadsActive(), 0, 'released before the status was sent');
      assert.deepEqual(await upload(h.uploads, tokens.a!, [open(), { record: header() }]), before);
    } finally {
      raw.close();
    }
    await unchanged();
  });

  it('a second stream of the same party takes over the open one, which ends with ABORTED and leaves nothing half-written', async () => {
    let stream: ReturnType<typeof h.uploads.upload> | undefined;
    const first = new Promise<UploadState>((resolve, reject) => {
      stream = h.uploads.upload(auth(tokens.a!), (err, res) => (err === null ? resolve(res) : reject(err)));
    });
    // Failing while the second stream is awaited: checked below.
    first.catch(() => {});
    // The first stream stops in the middle of a tensor, as a frozen client would.
    const [begin, chunk] = tensor(2);
    stream!.write(open());
    for (const record of [header(), begin!, chunk!]) stream!.write({ record });
    for (let i = 0; i < 100 && (await uploadsActive()) !== 1; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(await uploadsActive(), 1);
    assert.deepEqual(await upload(h.uploads, tokens.a!, [open(), { record: header() }]), before);
    await rejectsWith(first, status.ABORTED, /newer upload stream of party a .* took over/);
    stream!.end();
    assert.equal(await uploadsActive(), 0);
    await unchanged();
  });

  it('accepts and ignores tensors already held, resumes, and refuses uploads once the job is closed', async () => {
    const held = new Set(before.tensorsReceived);
    const again = await upload(
      h.uploads,
      tokens.a!,
      uploadMessages(jobId, 'a', [header(), ...tensor(0), ...tensor(1)]),
    );
    assert.deepEqual(again, before);
    // Resume: only the tensors the server does not hold.
    const missing = records.filter((r, i) => {
      if (r.header !== undefined) return true;
      const begins = records.slice(0, i + 1).filter((x) => x.tensorBegin !== undefined);
      return !held.has(begins.at(-1)!.tensorBegin!.name);
    });
    const done = await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', missing));
    assert.equal(done.complete, true);
    assert.equal(done.tensorsReceived.length, done.tensorsExpected);
    assert.deepEqual(done.tensorsReceived.slice(0, 2), before.tensorsReceived);
    // A complete party re-sending is still fine while the job collects.
    await upload(h.uploads, tokens.a!, uploadMessages(jobId, 'a', [header(), ...tensor(3)]));
    const cancelled = await call(h.jobs, 'cancelJob', { jobId, reason: 'closing the test job' }, ADMIN);
    assert.equal(cancelled.state, JobState.JOB_STATE_FAILED);
    await rejectsWith(
      upload(h.uploads, tokens.b!, uploadMessages(jobId, 'b', [header(), ...tensor(0)])),
      status.FAILED_PRECONDITION,
      /FAILED: it no longer takes uploads/,
    );
    assert.equal((await state('b')).tensorsReceived.length, 0);
    const events = await watchAll(h.jobs, ADMIN, jobId);
    assert.equal(events.filter((e) => e.partyJoined?.party === 'a').length, 1);
    assert.equal(
      events.filter((e) => e.uploadComplete?.party === 'a').length,
      1,
      'a re-sent header does not complete the upload twice',
    );
  });
});

/** Current value of dppa_uploads_active, scraped. */
async function uploadsActive(): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
  return Number(/^dppa_uploads_active (\S+)$/m.exec(text)?.[1]);
}

describe('uploads: the per-party byte cap', () => {
  it('RESOURCE_EXHAUSTED once a party would hold more than --max-upload-bytes', async () => {
    const small = await startHarness(join(dir, 'capped'), { maxUploadBytes: 2000 });
    try {
      const r = await call(
        small.jobs,
        'createJob',
        createJobRequest({ basePath: base, parties: ['a'], method: 'magnitude' }),
        ADMIN,
      );
      await rejectsWith(
        upload(small.uploads, r.tokens.a!, uploadMessages(r.job!.id, 'a', records)),
        status.RESOURCE_EXHAUSTED,
        /limit of 2000 bytes/,
      );
      const s = await call(small.uploads, 'getUploadState', { jobId: r.job!.id, party: 'a' }, r.tokens.a!);
      assert.ok(s.bytesReceived <= 2000n);
      assert.equal(s.complete, false);
    } finally {
      await small.close();
    }
  });
});

describe("uploads: the job's value bound", () => {
  /** Largest |value| of records' chunks, and for fine-tuned weights the largest |F − B| (fp32, from the base). */
  async function largestValues(recs: readonly DeltaRecord[]): Promise<{ value: number; diff: number }> {
    const b = await Checkpoint.open(base);
    try {
      let value = 0;
      let diff = 0;
      for (const r of recs) {
        if (r.chunk === undefined) continue;
        const c = decodeChunk(r.chunk);
        const weights = await b.readF32(r.chunk.tensor);
        for (let i = 0; i < c.count; i++) {
          const p = c.range ? c.firstPosition + i : c.positions[i]!;
          value = Math.max(value, Math.abs(c.values[i]!));
          diff = Math.max(diff, Math.abs(Math.fround(c.values[i]! - weights[p]!)));
        }
      }
      return { value, diff };
    } finally {
      await b.close();
    }
  }

  it('bounds deltas by max_abs_value (F − B for fine-tuned weights) naming the tensor, shows the bound', async () => {
    const create = (maxAbsValue: number) =>
      call(
        h.jobs,
        'createJob',
        {
          basePath: base,
          parties: ['a'],
          rate: 0.9,
          method: 'magnitude',
          label: '',
          dpa: undefined,
          merge: undefined,
          maxAbsValue,
          pruneMethod: 0,
          privacy: 0,
          threshold: 0,
          clipBound: 0,
          securePhaseSeconds: 0,
        },
        ADMIN,
      );
    await rejectsWith(create(-1), status.INVALID_ARGUMENT, /^max_abs_value: must be a finite number > 0/);
    assert.equal((await create(0)).job!.maxAbsValue, 1000, 'the default');

    // Deltas (format 1): the values sent are bounded.
    const deltas = await pruneRecords({ base, finetuned, rate: 0.9, method: 'magnitude', valueKind: 'delta' });
    assert.equal(deltas[0]!.header!.valueKind, ValueKind.VALUE_KIND_UNSPECIFIED);
    const largestDelta = (await largestValues(deltas)).value;
    const tight = await create(largestDelta / 2);
    assert.equal(tight.job!.maxAbsValue, largestDelta / 2);
    await rejectsWith(
      upload(h.uploads, tight.tokens.a!, uploadMessages(tight.job!.id, 'a', deltas)),
      status.INVALID_ARGUMENT,
      new RegExp(
        `tensor ".+": chunk \\d+: the value at position \\d+ is -?[0-9.e-]+; values must be finite with magnitude at most ${largestDelta / 2} \\(the job's max_abs_value\\)`,
      ),
    );
    const fits = await create(largestDelta);
    assert.equal((await upload(h.uploads, fits.tokens.a!, uploadMessages(fits.job!.id, 'a', deltas))).complete, true);

    // Fine-tuned weights (these records): F − B is bounded, not F, whose magnitude is far larger.
    assert.equal(records[0]!.header!.valueKind, ValueKind.VALUE_KIND_FINETUNED);
    const { value: largestF, diff: largestDiff } = await largestValues(records);
    assert.ok(largestDiff < largestF / 2, `largest |F − B| ${largestDiff}, largest |F| ${largestF}`);
    const halfDiff = await create(largestDiff / 2);
    await rejectsWith(
      upload(h.uploads, halfDiff.tokens.a!, uploadMessages(halfDiff.job!.id, 'a', records)),
      status.INVALID_ARGUMENT,
      new RegExp(
        `tensor ".+": chunk \\d+: the value at position \\d+ is -?[0-9.e-]+ \\(a fine-tuned weight, -?[0-9.e-]+ from the base's\\); deltas must have magnitude at most ${largestDiff / 2} \\(the job's max_abs_value\\)`,
      ),
    );
    const fitsDiff = await create(largestDiff);
    const state = await upload(h.uploads, fitsDiff.tokens.a!, uploadMessages(fitsDiff.job!.id, 'a', records));
    assert.equal(state.complete, true, 'fine-tuned weights whose F − B fits the bound, though |F| does not');

    // A push to a job bounded below the default sends deltas (format 1), which its bound fits.
    const bounded = await create(largestDelta);
    const client = new DppaClient({ address: h.address, token: bounded.tokens.a! });
    try {
      const pushed = await client.push({ jobId: bounded.job!.id, party: 'a', base, finetuned, workers: 1 });
      assert.equal(pushed.complete, true);
    } finally {
      client.close();
    }
  });

  it("fails with INTERNAL, not the party's INVALID_ARGUMENT, when the base was cut short after the job began", async () => {
    const copy = join(dir, 'base-cut-short');
    await cp(base, copy, { recursive: true });
    const job = await call(h.jobs, 'createJob', createJobRequest({ basePath: copy, parties: ['a'] }), ADMIN);
    const file = join(copy, 'model.safetensors');
    await truncate(file, (await stat(file)).size - 64);
    await rejectsWith(
      upload(h.uploads, job.tokens.a!, uploadMessages(job.job!.id, 'a', records)),
      status.INTERNAL,
      /^the server could not read the job's base \(the server log has the details\)$/,
    );
  });
});
