/**
 * Secure aggregation through a real server on loopback: in-process parties (proto/secure SecureParty) upload their
 * supports, keys, shares, masked vectors and unmask responses over gRPC; the merged checkpoint is compared with the
 * plain merge of the same scaled deltas computed here, and the data folder is searched for the parties' values.
 */
import assert from 'node:assert/strict';
import { cp, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials, status } from '@grpc/grpc-js';
import { JobState, Privacy, SecurePhase, type CreateJobResponse, type Job } from '../proto/gen/dppa/v1/jobs.js';
import { SecureAggregationServiceClient, type MaskedState, type SupportChunk } from '../proto/gen/dppa/v1/secure.js';
import { ValueDtype, ValueKind, type DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { fixedPoint, SecureParty, sumErrorBound, type FixedPoint } from '../proto/secure/index.js';
import { decodeJob } from '../server/jobs/job-store.js';
import { loadAggregator } from '../server/secure/secure-record.js';
import { sumDir, writeSum } from '../server/secure/secure-sum.js';
import { readUnion } from '../server/secure/union.js';
import {
  assembleTensor,
  chunkChecksum,
  crc32c,
  decodeChunk,
  foldChunkCrc,
  readDeltaTensors,
} from '../proto/sparse/index.js';
import { roundBf16 } from './fixtures/reference.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  auth,
  call,
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
let h: Harness;
let secure: SecureAggregationServiceClient;
/** Each fine-tune's pruned delta (bf16 values). */
const deltas: DeltaRecord[][] = [];
/** Weight each party applies to its own delta before it masks it. */
const WEIGHTS = [1, 0.5, 1.5, 0.75, 1.25];
// The synthetic deltas (DP at 0.8) reach 1.14 in magnitude, weighted up to 1.5 here.
const BOUND = 2;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-secure-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 33, finetunes: 5 });
  base = fam.base;
  for (const ft of fam.finetuned)
    deltas.push(await pruneRecords({ base, finetuned: ft, rate: 0.8, valueKind: 'delta' }));
  h = await startHarness(join(dir, 'data'));
  secure = new SecureAggregationServiceClient(h.address, credentials.createInsecure());
});
after(async () => {
  secure?.close();
  await h?.close();
  await rm(dir, { recursive: true, force: true });
});

/** The delta's records with the values dropped: a positions-only support (value_dtype NONE). */
function supportOf(records: readonly DeltaRecord[]): DeltaRecord[] {
  let crc = 0;
  return records.map((r) => {
    if (r.header !== undefined) return { header: { ...r.header, valueDtype: ValueDtype.VALUE_DTYPE_NONE } };
    if (r.tensorBegin !== undefined) crc = 0;
    if (r.chunk !== undefined) {
      const chunk = { ...r.chunk, valueDtype: ValueDtype.VALUE_DTYPE_NONE, values: new Uint8Array(0) };
      chunk.crc32c = chunkChecksum(chunk);
      crc = foldChunkCrc(crc, chunk.crc32c);
      return { chunk };
    }
    if (r.tensorEnd !== undefined) return { tensorEnd: { ...r.tensorEnd, crc32c: crc } };
    return r;
  });
}

/** A party's scaled values by tensor: position → weight · value. */
function scaledValues(records: readonly DeltaRecord[], weight: number): Map<string, Map<number, number>> {
  const out = new Map<string, Map<number, number>>();
  for (let i = 0; i < records.length; i++) {
    const begin = records[i]!.tensorBegin;
    if (begin === undefined) continue;
    const end = records.findIndex((r, j) => j > i && r.tensorEnd !== undefined);
    const t = assembleTensor(records.slice(i, end + 1));
    const m = new Map<number, number>();
    for (const e of t.partitions) e.positions.forEach((p, k) => m.set(p, weight * e.values[k]!));
    out.set(begin.name, m);
  }
  return out;
}

function createSecure(parties: string[], threshold: number, phaseSeconds = 0): Promise<CreateJobResponse> {
  return call(
    h.jobs,
    'createJob',
    {
      basePath: base,
      parties,
      rate: 0.8,
      method: 'dp',
      label: 'secure',
      dpa: { off: true, scaleOutsideByMax: false },
      merge: undefined,
      maxAbsValue: 0,
      pruneMethod: 0,
      privacy: Privacy.PRIVACY_SECURE,
      threshold,
      clipBound: BOUND,
      securePhaseSeconds: phaseSeconds,
    },
    ADMIN,
  );
}

async function waitFor(jobId: string, ready: (j: Job) => boolean): Promise<Job> {
  for (;;) {
    const j = await call(h.jobs, 'getJob', { jobId }, ADMIN);
    if (ready(j)) return j;
    if (j.state === JobState.JOB_STATE_FAILED && !ready(j)) assert.fail(`job failed: ${j.failureReason}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
const atPhase = (jobId: string, p: SecurePhase): Promise<Job> => waitFor(jobId, (j) => j.securePhase >= p);

function supportChunks(jobId: string, token: string): Promise<SupportChunk[]> {
  return new Promise((resolve, reject) => {
    const out: SupportChunk[] = [];
    const s = secure.getSupport({ jobId }, auth(token));
    s.on('data', (c: SupportChunk) => out.push(c));
    s.on('error', reject);
    s.on('end', () => resolve(out));
  });
}

function uploadMasked(token: string, chunks: Chunk[]): Promise<MaskedState> {
  return new Promise((resolve, reject) => {
    const s = secure.uploadMasked(auth(token), (err, res) => (err === null ? resolve(res) : reject(err)));
    for (const c of chunks) s.write({ clipped: 0n, ...c });
    s.end();
  });
}

function maskedChunks(jobId: string, words: Uint32Array, from = 0, size = 1000): ReturnType<typeof chunkList> {
  return chunkList(jobId, words, from, size, words.length);
}
/** A MaskedChunk as these tests send it. */
type Chunk = { jobId: string; offset: bigint; words: Uint8Array; crc32c: number; totalWords: bigint; clipped?: bigint };

function chunkList(jobId: string, words: Uint32Array, from: number, size: number, total: number): Chunk[] {
  const out: Chunk[] = [];
  for (let o = from; o < words.length; o += size) {
    const bytes = new Uint8Array(words.buffer, words.byteOffset + o * 4, Math.min(size, words.length - o) * 4).slice();
    out.push({ jobId, offset: BigInt(o), words: bytes, crc32c: crc32c(bytes), totalWords: BigInt(total) });
  }
  return out;
}

/**
 * The chunks with a clipped count on the last: the party's number in the job (these parties clip nothing; the
 * server takes the count as reported and publishes the sum over U3).
 */
function reportClipped(chunks: Chunk[], p: { name: string }, job: Job): Chunk[] {
  const last = chunks.at(-1);
  if (last !== undefined) last.clipped = BigInt(job.parties.findIndex((q) => q.name === p.name) + 1);
  return chunks;
}

/**
 * A secure job of `names` (t = 2) brought to MASKED_INPUT by in-process parties, and words for each party's masked
 * vector (they do not matter here, the job is not unmasked: distinct per party and position).
 */
async function toMaskedInput(
  names: string[],
): Promise<{ jobId: string; token: (n: string) => string; size: number; words: Uint32Array[] }> {
  const { job, tokens } = await createSecure(names, 2);
  const jobId = job!.id;
  const token = (n: string): string => tokens[n]!;
  for (const [i, name] of names.entries())
    await upload(h.uploads, token(name), uploadMessages(jobId, name, supportOf(deltas[i]!)));
  await atPhase(jobId, SecurePhase.SECURE_PHASE_KEYS);
  const sps = names.map((_, i) => SecureParty.create({ jobId, parties: names.length, threshold: 2 }, i + 1));
  for (const [i, sp] of sps.entries()) {
    const ad = sp.advertise();
    await call(secure, 'advertiseKeys', { jobId, ...ad }, token(names[i]!));
  }
  await atPhase(jobId, SecurePhase.SECURE_PHASE_SHARES);
  for (const [i, sp] of sps.entries()) {
    const roster = await call(secure, 'getRoster', { jobId }, token(names[i]!));
    await call(secure, 'submitShares', { jobId, shares: sp.shareKeys(roster.parties) }, token(names[i]!));
  }
  await atPhase(jobId, SecurePhase.SECURE_PHASE_MASKED_INPUT);
  const size = Number((await supportChunks(jobId, token(names[0]!)))[0]!.unionSize);
  assert.ok(size > 3000, `|U| = ${size}`);
  const words = names.map((_, i) => Uint32Array.from({ length: size }, (_, k) => (k * 2654435761 + i) >>> 0));
  return { jobId, token, size, words };
}

/** One in-process party: its token, protocol state and scaled values. */
interface Party {
  name: string;
  token: string;
  values: Map<string, Map<number, number>>;
  sp?: SecureParty;
  masked?: Uint32Array;
}

/** The values of a party laid out on U (stream order), 0 where it kept nothing. */
function onUnion(chunks: SupportChunk[], values: Map<string, Map<number, number>>): Float64Array {
  const size = Number(chunks[0]?.unionSize ?? 0n);
  const out = new Float64Array(size);
  for (const c of chunks) {
    const d = decodeChunk(c.chunk!);
    const m = values.get(c.chunk!.tensor);
    d.positions.forEach((p, k) => (out[Number(c.unionOffset) + k] = m?.get(p) ?? 0));
  }
  return out;
}

/** base + Σ values of `who`, fp32, per tensor. */
async function expected(who: Party[]): Promise<Map<string, Float64Array>> {
  const b = await Checkpoint.open(base);
  const out = new Map<string, Float64Array>();
  for (const t of b.tensors()) {
    const acc = Float64Array.from(await b.readF32(t.name));
    for (const p of who) for (const [pos, v] of p.values.get(t.name) ?? []) acc[pos] = acc[pos]! + v;
    out.set(t.name, acc);
  }
  await b.close();
  return out;
}

/** Fraction of entries whose bf16 rounding equals, and the largest fp32 difference before rounding. */
async function compareMerged(jobId: string, exp: Map<string, Float64Array>): Promise<{ same: number; total: number }> {
  const merged = await Checkpoint.open(join(dir, 'data', 'jobs', jobId, 'merged'));
  let same = 0;
  let total = 0;
  for (const [name, e] of exp) {
    const got = await merged.readF32(name);
    got.forEach((g, i) => {
      total++;
      if (roundBf16(g) === roundBf16(Math.fround(e[i]!))) same++;
    });
  }
  await merged.close();
  return { same, total };
}

/** Runs the rounds for `parties` (those in `dropBeforeMasked` stop after their shares). */
async function runProtocol(
  job: Job,
  parties: Party[],
  fp: FixedPoint,
  opts: { dropBeforeMasked?: string[]; badInput?: boolean; beforeUnmask?: () => Promise<void> } = {},
): Promise<void> {
  const jobId = job.id;
  for (const p of parties)
    await upload(h.uploads, p.token, uploadMessages(jobId, p.name, supportOf(deltas[parties.indexOf(p)]!)));
  await atPhase(jobId, SecurePhase.SECURE_PHASE_KEYS);
  for (const p of parties) {
    const index = job.parties.findIndex((s) => s.name === p.name) + 1;
    p.sp = SecureParty.create({ jobId, parties: job.parties.length, threshold: job.threshold }, index);
    const ad = p.sp.advertise();
    const r = await call(
      secure,
      'advertiseKeys',
      { jobId, maskPublicKey: ad.maskPublicKey, sharePublicKey: ad.sharePublicKey },
      p.token,
    );
    assert.equal(r.partyIndex, index);
  }
  await atPhase(jobId, SecurePhase.SECURE_PHASE_SHARES);
  for (const p of parties) {
    const roster = await call(secure, 'getRoster', { jobId }, p.token);
    assert.equal(roster.parties.length, parties.length);
    const boxes = p.sp!.shareKeys(roster.parties);
    await call(secure, 'submitShares', { jobId, shares: boxes }, p.token);
    if (opts.badInput === true && p === parties[0]) {
      await rejectsWith(
        call(secure, 'submitShares', { jobId, shares: boxes }, p.token),
        status.ALREADY_EXISTS,
        /twice/,
      );
    }
  }
  await atPhase(jobId, SecurePhase.SECURE_PHASE_MASKED_INPUT);
  const live = parties.filter((p) => !(opts.dropBeforeMasked ?? []).includes(p.name));
  for (const p of live) {
    const got = await call(secure, 'getShares', { jobId }, p.token);
    p.sp!.receiveShares(got.shares);
    const u = await supportChunks(jobId, p.token);
    const values = onUnion(u, p.values);
    const enc = p.sp!.maskInput(values, fp);
    assert.equal(enc.clipped, 0);
    p.masked = enc.words;
    if (opts.badInput === true && p === live[0]) {
      // Another length than |U|, and words past its end: refused before anything is stored.
      await rejectsWith(
        uploadMasked(p.token, chunkList(jobId, enc.words, 0, 1000, enc.words.length + 1)),
        status.INVALID_ARGUMENT,
        /total_words/,
      );
      const longer = new Uint32Array(enc.words.length + 3);
      longer.set(enc.words);
      await rejectsWith(
        uploadMasked(p.token, chunkList(jobId, longer, 0, longer.length, enc.words.length)),
        status.INVALID_ARGUMENT,
        /run past/,
      );
      // Resumable: half now, the rest after asking what the server holds.
      const half = maskedChunks(jobId, enc.words).slice(0, 1);
      await uploadMasked(p.token, half);
      const state = await call(secure, 'getMaskedState', { jobId }, p.token);
      assert.equal(state.complete, false);
      const rest = await uploadMasked(
        p.token,
        reportClipped(maskedChunks(jobId, enc.words, Number(state.wordsHeld)), p, job),
      );
      assert.equal(rest.complete, true);
      continue;
    }
    const state = await uploadMasked(p.token, reportClipped(maskedChunks(jobId, enc.words), p, job));
    assert.equal(state.complete, true);
    assert.equal(state.wordsExpected, BigInt(enc.words.length));
  }
  await atPhase(jobId, SecurePhase.SECURE_PHASE_UNMASK);
  await opts.beforeUnmask?.();
  for (const p of live) {
    const req = await call(secure, 'getUnmaskRequest', { jobId }, p.token);
    const res = p.sp!.unmask({ survivors: req.survivors, dropouts: req.dropouts });
    await call(
      secure,
      'submitUnmask',
      { jobId, selfSeedShares: res.selfSeedShares, maskKeyShares: res.maskKeyShares },
      p.token,
    );
  }
}

describe('secure aggregation through the server', () => {
  it('refuses secure jobs the server cannot run: threshold, clip bound, server-side search, weights', async () => {
    const base3 = { parties: ['a', 'b', 'c'] };
    const req = (extra: object) =>
      call(
        h.jobs,
        'createJob',
        {
          basePath: base,
          ...base3,
          rate: 0.8,
          method: 'dp',
          label: '',
          dpa: undefined,
          merge: undefined,
          maxAbsValue: 0,
          pruneMethod: 0,
          privacy: Privacy.PRIVACY_SECURE,
          threshold: 2,
          clipBound: 1,
          securePhaseSeconds: 0,
          ...extra,
        },
        ADMIN,
      );
    await rejectsWith(req({ threshold: 1 }), status.INVALID_ARGUMENT, /^threshold: must be in \[2, 3\]/);
    await rejectsWith(req({ threshold: 4 }), status.INVALID_ARGUMENT, /^threshold/);
    await rejectsWith(req({ clipBound: 0 }), status.INVALID_ARGUMENT, /^clip_bound/);
    await rejectsWith(req({ clipBound: -1 }), status.INVALID_ARGUMENT, /^clip_bound/);
    await rejectsWith(
      req({
        dpa: {
          search: {
            evaluator: 2,
            method: 0,
            tuner: 0,
            start: 0,
            step: 0,
            upper: 0,
            lower: 0,
            budget: 0,
            downward: false,
            partyEvaluator: {},
            partyTimeoutSeconds: 0,
          },
          scaleOutsideByMax: false,
        },
      }),
      status.INVALID_ARGUMENT,
      /^dpa\.search: a secure job/,
    );
    await rejectsWith(
      req({ dpa: { fixed: { factors: [2, 1], perParty: {} }, scaleOutsideByMax: false } }),
      status.INVALID_ARGUMENT,
      /^dpa\.fixed/,
    );
    await rejectsWith(
      req({ merge: { weights: { a: 2 }, signElection: false, partiesMayDownload: false, output: 0 } }),
      status.INVALID_ARGUMENT,
      /^merge\.weights\[a\]/,
    );
    await rejectsWith(
      req({ privacy: Privacy.PRIVACY_PLAIN }),
      status.INVALID_ARGUMENT,
      /^threshold: only for privacy SECURE/,
    );
    // A deadline beyond what a timer can wait, and more parties than the job record can carry.
    await rejectsWith(req({ securePhaseSeconds: 7 * 24 * 3600 + 1 }), status.INVALID_ARGUMENT, /^secure_phase_seconds/);
    await req({ securePhaseSeconds: 7 * 24 * 3600 });
    const many = Array.from({ length: 65 }, (_, i) => `m${i}`);
    await rejectsWith(req({ parties: many }), status.INVALID_ARGUMENT, /^parties: a secure job takes at most 64/);
  });

  it('masked input: a torn chunk, a second stream, a restart mid-vector and a vector whose record was lost', async () => {
    const names = ['s1', 's2', 's3'];
    const { jobId, token, size, words } = await toMaskedInput(names);
    const chunks = maskedChunks(jobId, words[0]!);

    // Bytes that are not whole words are refused; nothing of that chunk is kept.
    const torn = { ...chunks[0]!, words: chunks[0]!.words.subarray(0, 3998) };
    torn.crc32c = crc32c(torn.words);
    await rejectsWith(uploadMasked(token('s1'), [torn]), status.INVALID_ARGUMENT, /not whole 4-byte words/);
    assert.equal((await call(secure, 'getMaskedState', { jobId }, token('s1'))).wordsHeld, 0n);

    // While one stream of s1 is open, a second one is refused (it would write to the same file).
    let first!: (c: (typeof chunks)[number]) => void;
    let end!: () => void;
    const open = new Promise<MaskedState>((resolve, reject) => {
      const st = secure.uploadMasked(auth(token('s1')), (err, res) => (err === null ? resolve(res) : reject(err)));
      first = (c) => st.write({ clipped: 0n, ...c });
      end = () => st.end();
    });
    first(chunks[0]!);
    while ((await call(secure, 'getMaskedState', { jobId }, token('s1'))).wordsHeld < 1000n)
      await new Promise((r) => setTimeout(r, 10));
    await rejectsWith(uploadMasked(token('s1'), chunks.slice(1)), status.ALREADY_EXISTS, /already has a masked upload/);
    end();
    assert.deepEqual(await open, { wordsHeld: 1000n, wordsExpected: BigInt(size), complete: false });

    // s2's file holds its whole vector but the record of it was lost (the store update failed): asking for the
    // state records it. s3's likewise: an empty chunk at |U| records it.
    const maskedDir = join(dir, 'data', 'jobs', jobId, 'secure', 'masked');
    await writeFile(join(maskedDir, 's2.u32'), new Uint8Array(words[1]!.buffer));
    await writeFile(join(maskedDir, 's3.u32'), new Uint8Array(words[2]!.buffer));
    assert.deepEqual(await call(secure, 'getMaskedState', { jobId }, token('s2')), {
      wordsHeld: BigInt(size),
      wordsExpected: BigInt(size),
      complete: true,
    });
    const empty = new Uint8Array(0);
    const s3 = await uploadMasked(token('s3'), [
      { jobId, offset: BigInt(size), words: empty, crc32c: crc32c(empty), totalWords: BigInt(size) },
    ]);
    assert.equal(s3.complete, true);

    // The server restarts with s1 half-way: it resumes at the words held.
    secure.close();
    await h.close();
    h = await startHarness(join(dir, 'data'));
    secure = new SecureAggregationServiceClient(h.address, credentials.createInsecure());
    const st = await call(secure, 'getMaskedState', { jobId }, token('s1'));
    assert.deepEqual(st, { wordsHeld: 1000n, wordsExpected: BigInt(size), complete: false });
    const rest = await uploadMasked(token('s1'), maskedChunks(jobId, words[0]!, 1000));
    assert.equal(rest.complete, true);
    await atPhase(jobId, SecurePhase.SECURE_PHASE_UNMASK);
    const req = await call(secure, 'getUnmaskRequest', { jobId }, token('s1'));
    assert.deepEqual(req.survivors, [1, 2, 3]);
    assert.deepEqual(req.dropouts, []);
    const held = await readFile(join(maskedDir, 's1.u32'));
    assert.deepEqual(new Uint8Array(held), new Uint8Array(words[0]!.buffer));
    await call(h.jobs, 'cancelJob', { jobId, reason: 'test done' }, ADMIN).catch(() => undefined);
  });

  it('clipped counts survive the repair of a whole vector whose record was lost in a restart', async () => {
    const names = ['c1', 'c2', 'c3'];
    const { jobId, token, size, words } = await toMaskedInput(names);
    const CLIPPED = [6, 7, 5];
    const last = (i: number): Chunk[] => {
      const chunks = maskedChunks(jobId, words[i]!);
      chunks.at(-1)!.clipped = BigInt(CLIPPED[i]!);
      return chunks;
    };
    // c1 and c2 send all but their last chunk; the record as it stands then is what a server killed after writing
    // their last words, before recording them, leaves behind.
    for (const i of [0, 1]) await uploadMasked(token(names[i]!), last(i).slice(0, -1));
    const jobJson = join(dir, 'data', 'jobs', jobId, 'job.json');
    const before = await readFile(jobJson);
    for (const i of [0, 1]) assert.equal((await uploadMasked(token(names[i]!), last(i).slice(-1))).complete, true);
    secure.close();
    await h.close();
    await writeFile(jobJson, before);
    h = await startHarness(join(dir, 'data'));
    secure = new SecureAggregationServiceClient(h.address, credentials.createInsecure());
    const survivors = async (): Promise<number[]> =>
      loadAggregator(decodeJob(await readFile(jobJson, 'utf8'), 'job.json').secure!).state.survivors;
    assert.deepEqual(await survivors(), []);
    // c1 asks for its state, c2 sends an empty chunk at |U| (reporting nothing): both are recorded, with their counts.
    assert.equal((await call(secure, 'getMaskedState', { jobId }, token('c1'))).complete, true);
    const empty = new Uint8Array(0);
    const c2 = await uploadMasked(token('c2'), [
      { jobId, offset: BigInt(size), words: empty, crc32c: crc32c(empty), totalWords: BigInt(size), clipped: 0n },
    ]);
    assert.equal(c2.complete, true);
    assert.deepEqual(await survivors(), [1, 2]);
    const events = watchAll(h.jobs, ADMIN, jobId);
    assert.equal((await uploadMasked(token('c3'), last(2))).complete, true);
    await atPhase(jobId, SecurePhase.SECURE_PHASE_UNMASK);
    await call(h.jobs, 'cancelJob', { jobId, reason: 'test done' }, ADMIN);
    const closed = (await events).flatMap((e) =>
      e.securePhaseClosed?.phase === SecurePhase.SECURE_PHASE_MASKED_INPUT ? [e.securePhaseClosed] : [],
    );
    assert.equal(closed.length, 1);
    assert.equal(closed[0]!.clipped, BigInt(6 + 7 + 5));
    assert.equal(closed[0]!.parties, 3);
  });

  it('3 parties: the secure merge equals the plain merge of the scaled deltas; bad input is refused, the job intact; no value in the data folder', async () => {
    const names = ['p1', 'p2', 'p3'];
    const { job, tokens } = await createSecure(names, 2);
    const copy = join(dir, 'copy-p');
    assert.equal(job!.privacy, Privacy.PRIVACY_SECURE);
    assert.equal(job!.securePhase, SecurePhase.SECURE_PHASE_SUPPORT);
    const parties: Party[] = names.map((name, i) => ({
      name,
      token: tokens[name]!,
      values: scaledValues(deltas[i]!, WEIGHTS[i]!),
    }));
    for (const p of parties)
      for (const m of p.values.values()) for (const v of m.values()) assert.ok(Math.abs(v) < BOUND);
    // Values in clear are refused for a secure job.
    await rejectsWith(
      upload(h.uploads, parties[0]!.token, uploadMessages(job!.id, 'p1', deltas[0]!)),
      status.FAILED_PRECONDITION,
      /value_dtype NONE/,
    );
    // A support whose values would be fine-tuned weights is refused: the masked sum is taken as deltas.
    const [head, ...rest] = supportOf(deltas[0]!);
    await rejectsWith(
      upload(
        h.uploads,
        parties[0]!.token,
        uploadMessages(job!.id, 'p1', [
          { header: { ...head!.header!, valueKind: ValueKind.VALUE_KIND_FINETUNED, formatVersion: 2 } },
          ...rest,
        ]),
      ),
      status.FAILED_PRECONDITION,
      /DeltaHeader value_kind: job \S+ is secure/,
    );
    // A token of this job cannot speak in another job's protocol.
    const other = await createSecure(['x', 'y'], 2);
    await rejectsWith(call(secure, 'getRoster', { jobId: other.job!.id }, parties[0]!.token), status.PERMISSION_DENIED);
    const fp = fixedPoint(BOUND, names.length);
    // Searched while the spool holds the supports and every masked vector, and again once merged.
    // Then the server restarts on the same data folder: the job resumes from its stored aggregator state.
    await runProtocol(job!, parties, fp, {
      badInput: true,
      beforeUnmask: async () => {
        await noValueInDataFolder(parties);
        secure.close();
        await h.close();
        // The masked vectors and U, kept here: the server deletes them once the job merged.
        await cp(join(dir, 'data', 'jobs', job!.id, 'secure'), join(copy, 'secure'), { recursive: true });
        h = await startHarness(join(dir, 'data'));
        secure = new SecureAggregationServiceClient(h.address, credentials.createInsecure());
        const j = await call(h.jobs, 'getJob', { jobId: job!.id }, ADMIN);
        assert.equal(j.securePhase, SecurePhase.SECURE_PHASE_UNMASK);
      },
    });
    const done = await waitFor(job!.id, (j) => j.state === JobState.JOB_STATE_MERGED);
    assert.equal(done.securePhase, SecurePhase.SECURE_PHASE_DONE);
    const { same, total } = await compareMerged(job!.id, await expected(parties));
    assert.ok(same / total >= 0.9999, `${same} of ${total} bf16 weights identical`);
    // The comparison can fail: the base alone, or one party less, differs in many more weights.
    const baseOnly = await compareMerged(job!.id, await expected([]));
    assert.ok(baseOnly.same / baseOnly.total < 0.99, `${baseOnly.same} of ${baseOnly.total} identical to the base`);
    const twoOnly = await compareMerged(job!.id, await expected(parties.slice(0, 2)));
    assert.ok(twoOnly.same / twoOnly.total < 0.99);
    // The unmasked sum on U, before the merge rounds it, is within the fixed-point bound n·2^-(k+1) of the Σ of
    // the scaled values computed here (plus the rounding of the F32 it is stored in).
    const bound = sumErrorBound(fp);
    assert.ok(bound < 1e-8);
    // Nothing derived from the values is left: no masked vector, no unmasked sum, nor U (nothing reads it once the
    // job merged). Deleted once MERGED is written, so looked for until they are gone, at most a minute.
    const secureDir = join(dir, 'data', 'jobs', job!.id, 'secure');
    const derived = (files: string[]): boolean => files.some((f) => /masked|sum|^union\.|\.u32$|\.dppa$/.test(f));
    let left = await readdir(secureDir, { recursive: true });
    for (let i = 0; i < 600 && derived(left); i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = await readdir(secureDir, { recursive: true });
    }
    assert.ok(!derived(left), left.join(', '));
    // U is in the base checkpoint's tensor order (that of every delta), here not the order of the names.
    const union = await readUnion(copy);
    const b = await Checkpoint.open(base);
    const baseOrder = b.tensors().map((t) => t.name);
    await b.close();
    const unionNames = union.tensors.map((t) => t.name);
    assert.deepEqual(
      unionNames,
      baseOrder.filter((n) => unionNames.includes(n)),
    );
    assert.notDeepEqual(unionNames, [...unionNames].sort());
    // The sum the server wrote, written again from the copy with the stored aggregator (the same code).
    const stored = decodeJob(await readFile(join(dir, 'data', 'jobs', job!.id, 'job.json'), 'utf8'), 'job.json');
    const agg = loadAggregator(stored.secure!);
    const survivors = agg.state.request!.survivors.map((i) => names[i - 1]!);
    await writeSum(copy, union, survivors, agg.maskRemoval(), fp, stored.baseFingerprint, new AbortController().signal);
    const sumFolder = sumDir(copy);
    let checked = 0;
    let worst = 0;
    for (const f of await readdir(sumFolder)) {
      for await (const item of readDeltaTensors(join(sumFolder, f))) {
        if (item.kind !== 'tensor') continue;
        const t = item.tensor;
        for (const e of t.partitions) {
          e.positions.forEach((pos, k) => {
            const want = parties.reduce((sum, q) => sum + (q.values.get(t.name)?.get(pos) ?? 0), 0);
            const err = Math.abs(e.values[k]! - want) - Math.abs(want) * 2 ** -24;
            worst = Math.max(worst, err);
            checked++;
          });
        }
      }
    }
    assert.ok(checked > 1000, `${checked} positions of U checked`);
    assert.ok(worst <= bound, `largest error ${worst} beyond the bound ${bound}`);

    await noValueInDataFolder(parties);
  });

  it('5 parties, t = 3: one drops after its shares, before its masked input; the merge is that of the 4 others', async () => {
    const names = ['q1', 'q2', 'q3', 'q4', 'q5'];
    // Each phase waits 10 s at most: long enough for every live party on a loaded machine, short enough to wait out q4.
    const { job, tokens } = await createSecure(names, 3, 10);
    const parties: Party[] = names.map((name, i) => ({
      name,
      token: tokens[name]!,
      values: scaledValues(deltas[i]!, WEIGHTS[i]!),
    }));
    await runProtocol(job!, parties, fixedPoint(BOUND, names.length), { dropBeforeMasked: ['q4'] });
    const done = await waitFor(job!.id, (j) => j.state === JobState.JOB_STATE_MERGED);
    assert.equal(done.state, JobState.JOB_STATE_MERGED);
    const events = await new Promise<string[]>((resolve, reject) => {
      const out: string[] = [];
      const s = h.jobs.watchJob({ jobId: job!.id, afterSeq: 0n }, auth(ADMIN));
      s.on(
        'data',
        (e: { securePhaseClosed?: { phase: number; parties: number; missing: string[]; clipped: bigint } }) => {
          const c = e.securePhaseClosed;
          if (c !== undefined) out.push(`${c.phase}:${c.parties}:${c.missing.join(',')}:${c.clipped}`);
        },
      );
      s.on('error', reject);
      s.on('end', () => resolve(out));
    });
    // MASKED_INPUT's clipped count: the sum of those U3 reported (q1, q2, q3, q5 report 1, 2, 3, 5; q4 dropped).
    assert.deepEqual(events, ['1:5::0', '2:5::0', '3:5::0', '4:4:q4:11', '5:4::0']);
    const metrics = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
    assert.match(metrics, /^dppa_secure_clipped_values_total \d+/m);
    const { same, total } = await compareMerged(job!.id, await expected(parties.filter((p) => p.name !== 'q4')));
    assert.ok(same / total >= 0.9999, `${same} of ${total} bf16 weights identical`);
    const withDropout = await compareMerged(job!.id, await expected(parties));
    assert.ok(withDropout.same / withDropout.total < 0.99);
  });

  it('a phase that cannot close for another reason: tried again, then the job fails by the failure policy', async () => {
    const saved = h;
    const data = join(dir, 'data-attempts');
    h = await startHarness(data, { taskAttempts: 2 });
    try {
      const names = ['f1', 'f2'];
      const { job, tokens } = await createSecure(names, 2);
      const jobId = job!.id;
      // A file where the union's folder goes: building U fails (EEXIST / ENOTDIR), an "unexpected" failure.
      await writeFile(join(data, 'jobs', jobId, 'secure'), 'not a folder');
      for (const [i, name] of names.entries())
        await upload(h.uploads, tokens[name]!, uploadMessages(jobId, name, supportOf(deltas[i]!)));
      let j = await call(h.jobs, 'getJob', { jobId }, ADMIN);
      for (let polls = 0; j.state !== JobState.JOB_STATE_FAILED && polls < 3000; polls++) {
        await new Promise((r) => setTimeout(r, 20));
        j = await call(h.jobs, 'getJob', { jobId }, ADMIN);
      }
      assert.equal(j.state, JobState.JOB_STATE_FAILED, `job still ${j.state} (phase ${j.securePhase})`);
      assert.match(j.failureReason, /^secure aggregation failed after 2 attempts: /);
      assert.equal(j.securePhase, SecurePhase.SECURE_PHASE_SUPPORT);
    } finally {
      await h.close();
      h = saved;
    }
  });

  it('fewer than t parties left when a phase closes: the job fails with TooFewSurvivorsError, nothing written', async () => {
    const names = ['r1', 'r2', 'r3'];
    const { job, tokens } = await createSecure(names, 3, 3);
    const jobId = job!.id;
    // On a slow machine SUPPORT may close (and the job fail) before the last support is in: that upload is refused.
    for (const [i, name] of names.entries())
      await upload(h.uploads, tokens[name]!, uploadMessages(jobId, name, supportOf(deltas[i]!))).catch((err: unknown) =>
        assert.match(String(err), /FAILED_PRECONDITION: job \S+ is FAILED/),
      );
    // r3 never advertises its keys: KEYS closes at its deadline with 2 < t = 3 (or SUPPORT does, on a slow machine).
    await atPhase(jobId, SecurePhase.SECURE_PHASE_KEYS).catch(() => undefined);
    for (const [i, name] of names.slice(0, 2).entries()) {
      const sp = SecureParty.create({ jobId, parties: 3, threshold: 3 }, i + 1);
      const ad = sp.advertise();
      await call(
        secure,
        'advertiseKeys',
        { jobId, maskPublicKey: ad.maskPublicKey, sharePublicKey: ad.sharePublicKey },
        tokens[name]!,
      ).catch(() => undefined);
    }
    const failed = await waitFor(jobId, (j) => j.state === JobState.JOB_STATE_FAILED);
    assert.match(failed.failureReason, /^TooFewSurvivorsError/);
    // The job stays at the phase that could not close, and the reason names it.
    if (failed.securePhase === SecurePhase.SECURE_PHASE_KEYS)
      assert.match(failed.failureReason, /share keys: 2 parties left, the threshold is 3/);
    else {
      assert.equal(failed.securePhase, SecurePhase.SECURE_PHASE_SUPPORT);
      assert.match(failed.failureReason, /support: \d parties left/);
    }
    const files = await readdir(join(dir, 'data', 'jobs', jobId), { recursive: true });
    assert.ok(!files.some((f) => /merged|[/\\]sum|patch/.test(f)), files.join(', '));
    // The failed job's secure data was discarded (its mark written once). At the next start the discard runs again
    // without writing the mark anew, and temporary files a crash left in secure/ are removed.
    const folder = join(dir, 'data', 'jobs', jobId, 'secure');
    let mark = await stat(join(folder, 'discarded')).catch(() => undefined);
    for (let polls = 0; mark === undefined && polls < 3000; polls++) {
      await new Promise((r) => setTimeout(r, 20));
      mark = await stat(join(folder, 'discarded')).catch(() => undefined);
    }
    assert.ok(mark !== undefined, 'the discard mark');
    const temps = ['discarded.tmp-0a1b2c3d4e5f', 'union.json.tmp-0a1b2c3d4e5f'];
    for (const t of temps) await writeFile(join(folder, t), 'cut off\n');
    secure.close();
    await h.close();
    h = await startHarness(join(dir, 'data'));
    secure = new SecureAggregationServiceClient(h.address, credentials.createInsecure());
    const now = await readdir(folder);
    assert.ok(!temps.some((t) => now.includes(t)), now.join(', '));
    assert.equal((await stat(join(folder, 'discarded'))).ino, mark.ino, 'the mark is not written again');
  });
});

/** Every file's bytes under `root` (recursively) that `keep` accepts, concatenated with separators. */
async function folderBytes(root: string, keep: (path: string) => boolean): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (const e of await readdir(root, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    const p = join(e.parentPath, e.name);
    // A file the server removes meanwhile (the spool once the job merged) is skipped.
    const data = keep(p)
      ? await readFile(p).catch((err: NodeJS.ErrnoException) =>
          err.code === 'ENOENT' ? undefined : Promise.reject(err),
        )
      : undefined;
    if (data !== undefined) parts.push(data, Buffer.from([0xde, 0xad, 0xbe, 0xef]));
  }
  return Buffer.concat(parts);
}

/** Asserts that no party's kept values (as its plain upload would spool them) are in the data folder. */
async function noValueInDataFolder(parties: readonly Party[]): Promise<void> {
  // No party value anywhere in the data folder but in the merged outputs and the unmasked sum (which hold
  // base + Σ): for each party, 4 consecutive kept values of one chunk as their bf16 bytes (8 bytes, as a plain
  // upload spools them). The same search finds them in the party's plain delta.
  const bytes = await folderBytes(join(dir, 'data'), (p) => !/merged|patch|[/\\]sum[/\\]/.test(p));
  assert.ok(bytes.length > 10_000);
  for (const [i, p] of parties.entries()) {
    const chunks = deltas[i]!.flatMap((r) => (r.chunk !== undefined && r.chunk.count >= 4 ? [r.chunk] : []));
    const plain = Buffer.concat(chunks.map((c) => c.values));
    for (const c of chunks.slice(0, 20)) {
      const run = Buffer.from(c.values.subarray(0, 8));
      assert.notEqual(plain.indexOf(run), -1);
      assert.equal(bytes.indexOf(run), -1, `party ${p.name}'s bf16 values appear in the data folder`);
    }
  }
}
