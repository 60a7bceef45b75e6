import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { applyDelta, pruneToFile } from '../client/index.js';
import { JobState, type CreateJobResponse, type Job } from '../proto/gen/dppa/v1/jobs.js';
import { ValueKind, type DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { FormatError } from '../proto/errors.js';
import { Checkpoint, encodeFromF32, writeCheckpoint, type Dtype } from '../proto/safetensors/index.js';
import { decodeChunk, FinetunedToDelta } from '../proto/sparse/index.js';
import { roundBf16 } from './fixtures/reference.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  call,
  createJobRequest,
  pruneRecords,
  rejectsWith,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from './fixtures/grpc-harness.js';

let dir: string;
let h: Harness;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-exact-'));
  h = await startHarness(join(dir, 'data'));
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** A one-party job at `rate` with partition levels [rate] and factor 1 (`method` dp unless given). */
async function createJob(base: string, rate: number, method = 'dp'): Promise<CreateJobResponse> {
  return call(
    h.jobs,
    'createJob',
    createJobRequest({
      basePath: base,
      parties: ['solo'],
      rate,
      method,
      label: 'exact',
      dpa: { fixed: { factors: [1], perParty: {} }, scaleOutsideByMax: false },
    }),
    ADMIN,
  );
}

async function waitMerged(jobId: string): Promise<Job> {
  for (;;) {
    const j = await call(h.jobs, 'getJob', { jobId }, ADMIN);
    if (j.state === JobState.JOB_STATE_MERGED || j.state === JobState.JOB_STATE_FAILED) return j;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Number of elements whose stored bytes differ between two checkpoints of the same layout and dtype. */
async function differingWeights(a: string, b: string): Promise<{ differ: number; total: number }> {
  const [x, y] = await Promise.all([Checkpoint.open(a), Checkpoint.open(b)]);
  try {
    let differ = 0;
    let total = 0;
    for (const info of x.tensors()) {
      assert.equal(y.info(info.name).dtype, info.dtype, info.name);
      const [p, q] = await Promise.all([x.readRaw(info.name), y.readRaw(info.name)]);
      const size = p.length / info.numel;
      for (let i = 0; i < info.numel; i++) {
        for (let k = 0; k < size; k++) {
          if (p[i * size + k] !== q[i * size + k]) {
            differ++;
            break;
          }
        }
      }
      total += info.numel;
    }
    return { differ, total };
  } finally {
    await Promise.all([x.close(), y.close()]);
  }
}

describe('exact values: fine-tuned weights on the wire', () => {
  const cases: { dtype: Dtype; valueDtype?: 'f32'; bytes: number }[] = [
    { dtype: 'BF16', bytes: 2 },
    { dtype: 'F16', bytes: 2 },
    { dtype: 'F32', valueDtype: 'f32', bytes: 4 },
  ];
  for (const c of cases) {
    // Bit for bit where F − B is exact in fp32: this fixture's fine-tunes stay within a factor of 2 of the base
    // (exact by Sterbenz even in F32), and hold no −0 (which comes back +0).
    it(`a single-party merge at rate 0, factor 1 reproduces a ${c.dtype} fine-tune bit for bit where F − B is exact (gRPC on loopback)`, async () => {
      const fam = await writeLlamaFamily(join(dir, c.dtype), { shape: TINY, seed: 5, dtype: c.dtype });
      const records = await pruneRecords({
        base: fam.base,
        finetuned: fam.finetuned[0]!,
        rate: 0,
        levels: [0],
        // Magnitude keeps every entry at rate 0 (DP moves each layer's rate up to ±λ around it).
        method: 'magnitude',
        ...(c.valueDtype === undefined ? {} : { valueDtype: c.valueDtype }),
      });
      const header = records[0]!.header!;
      assert.equal(header.valueKind, ValueKind.VALUE_KIND_FINETUNED);
      assert.equal(header.formatVersion, 2);
      // Same bytes per value as a delta of the checkpoint's width.
      const chunk = records.find((r) => r.chunk !== undefined)!.chunk!;
      assert.equal(chunk.values.length, chunk.count * c.bytes);

      const { job, tokens } = await createJob(fam.base, 0, 'magnitude');
      const state = await upload(h.uploads, tokens.solo!, uploadMessages(job!.id, 'solo', records));
      assert.equal(state.complete, true);
      const done = await waitMerged(job!.id);
      assert.equal(done.state, JobState.JOB_STATE_MERGED, done.failureReason);
      const merged = join(dir, 'data', 'jobs', job!.id, 'merged');
      const { differ, total } = await differingWeights(merged, fam.finetuned[0]!);
      assert.ok(total > 10000, `${total} weights compared`);
      assert.equal(differ, 0, `${differ} of ${total} weights differ from the fine-tune`);
    });
  }

  it("valueKind 'delta' sends bf16 deltas F − B (format version 1) where 'auto' would send F", async () => {
    const fam = await writeLlamaFamily(join(dir, 'kind'), { shape: TINY, seed: 13 });
    const o = { base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.5, levels: [0.5], method: 'magnitude' as const };
    const auto = await pruneRecords(o);
    const delta = await pruneRecords({ ...o, valueKind: 'delta' });
    assert.equal(auto[0]!.header!.valueKind, ValueKind.VALUE_KIND_FINETUNED);
    assert.equal(delta[0]!.header!.valueKind, ValueKind.VALUE_KIND_UNSPECIFIED);
    assert.equal(delta[0]!.header!.formatVersion, 1);
    // The same positions; the values are F − B rounded to bf16.
    const [b, f] = await Promise.all([Checkpoint.open(fam.base), Checkpoint.open(fam.finetuned[0]!)]);
    try {
      let name = '';
      let checked = 0;
      for (const [i, r] of delta.entries()) {
        if (r.tensorBegin !== undefined) name = r.tensorBegin.name;
        if (r.chunk === undefined) continue;
        const c = decodeChunk(r.chunk);
        assert.deepEqual([...c.positions], [...decodeChunk(auto[i]!.chunk!).positions]);
        const [bv, fv] = await Promise.all([b.readF32(name), f.readF32(name)]);
        c.positions.forEach((p, k) => {
          assert.equal(c.values[k], roundBf16(fv[p]! - bv[p]!), `${name}[${p}]`);
          checked++;
        });
      }
      assert.ok(checked > 1000);
    } finally {
      await Promise.all([b.close(), f.close()]);
    }
    await assert.rejects(
      pruneRecords({ ...o, valueKind: 'f' as never }),
      /^RangeError: valueKind: expected delta or auto, got f/,
    );
  });

  it('the party-side apply (DPA candidates) forms F − B too: rate 0 reproduces the fine-tune', async () => {
    const fam = await writeLlamaFamily(join(dir, 'apply'), { shape: TINY, seed: 7 });
    const delta = join(dir, 'apply.dppa');
    await pruneToFile({
      base: fam.base,
      finetuned: fam.finetuned[0]!,
      rate: 0,
      levels: [0],
      method: 'magnitude',
      out: delta,
    });
    const out = join(dir, 'applied');
    await applyDelta({ base: fam.base, delta, out });
    assert.equal((await differingWeights(out, fam.finetuned[0]!)).differ, 0);
    // Factors scale Δ = F − B, not F: factor 0 gives the base back.
    const zero = join(dir, 'applied-0');
    await applyDelta({ base: fam.base, delta, out: zero, factors: [0], outsideFactor: 0 });
    assert.equal((await differingWeights(zero, fam.base)).differ, 0);
  });

  it('refuses fine-tuned values from DARE, and a format version that does not fit the value kind', async () => {
    const fam = await writeLlamaFamily(join(dir, 'refuse'), { shape: TINY, seed: 9 });
    const records = await pruneRecords({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.5, levels: [0.5] });
    const withHeader = (patch: object): DeltaRecord[] => [
      { header: { ...records[0]!.header!, ...patch } },
      ...records.slice(1),
    ];
    const dp = await createJob(fam.base, 0.5);
    await rejectsWith(
      upload(h.uploads, dp.tokens.solo!, uploadMessages(dp.job!.id, 'solo', withHeader({ formatVersion: 1 }))),
      status.INVALID_ARGUMENT,
      /format_version is 1, but value_kind 2 needs format_version 2/,
    );
    const dare = await createJob(fam.base, 0.5, 'dare');
    await rejectsWith(
      upload(
        h.uploads,
        dare.tokens.solo!,
        uploadMessages(
          dare.job!.id,
          'solo',
          withHeader({ method: 'dare', pruneMethod: 0, options: { outside: 'dense' } }),
        ),
      ),
      status.INVALID_ARGUMENT,
      /DARE rescales its kept values/,
    );
  });
});

describe('a non-finite F − B at the merge', () => {
  it('fails the job naming the tensor (the base is at fault), instead of sending the party back', async () => {
    const fam = await writeLlamaFamily(join(dir, 'inf'), { shape: TINY, seed: 11, dtype: 'F32' });
    const records = await pruneRecords({
      base: fam.base,
      finetuned: fam.finetuned[0]!,
      rate: 0,
      levels: [0],
      method: 'magnitude',
      valueDtype: 'f32',
    });
    assert.equal(records[0]!.header!.valueKind, ValueKind.VALUE_KIND_FINETUNED);
    // The job's base: the same weights, one of them +Inf, so F − B is −Inf there whatever the party sent.
    const src = await Checkpoint.open(fam.base);
    const infBase = join(dir, 'inf-base');
    const victim = src.tensors()[0]!.name;
    try {
      const tensors = [];
      for (const info of src.tensors()) {
        const data = await src.readF32(info.name);
        if (info.name === victim) data[0] = Infinity;
        tensors.push({
          name: info.name,
          dtype: info.dtype,
          shape: [...info.shape],
          data: encodeFromF32(data, info.dtype),
        });
      }
      await writeCheckpoint(infBase, tensors);
    } finally {
      await src.close();
    }
    const { job, tokens } = await createJob(infBase, 0, 'magnitude');
    const sent: DeltaRecord[] = [
      { header: { ...records[0]!.header!, baseFingerprint: job!.baseFingerprint } },
      ...records.slice(1),
    ];
    const state = await upload(h.uploads, tokens.solo!, uploadMessages(job!.id, 'solo', sent));
    assert.equal(state.complete, true);
    for (;;) {
      const j = await call(h.jobs, 'getJob', { jobId: job!.id }, ADMIN);
      if (j.state === JobState.JOB_STATE_MERGED) assert.fail('merged despite an infinite base weight');
      // Sent back: collecting again, the party's upload discarded (the bug this guards against).
      assert.ok(
        j.state !== JobState.JOB_STATE_COLLECTING || j.parties.every((p) => p.uploadComplete),
        `the party was sent back: ${j.failureReason}`,
      );
      if (j.state === JobState.JOB_STATE_FAILED) {
        assert.match(j.failureReason, new RegExp(`tensor "${victim.replace(/\./g, '\\.')}"`));
        assert.match(j.failureReason, /flat position 0: .* is not a finite fp32 number/);
        assert.match(j.failureReason, /non-finite base weight/);
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  });
});

describe('FinetunedToDelta', () => {
  it('forms fp32 F − B at sparse and dense positions of bf16/f16/f32 bases, across windows, and refuses a non-finite result', async () => {
    const n = (1 << 20) + 5; // more than one window
    const f32 = new Float32Array(n);
    for (let i = 0; i < n; i++) f32[i] = ((i % 97) - 48) / 64;
    for (const dtype of ['BF16', 'F16', 'F32'] as const) {
      const path = join(dir, `conv-${dtype}`);
      await writeCheckpoint(path, [{ name: 'w', dtype, shape: [n], data: encodeFromF32(f32, dtype) }]);
      const base = await Checkpoint.open(path);
      try {
        const conv = new FinetunedToDelta(base, 'w');
        const positions = Float64Array.of(3, 1000, n - 2, n - 1);
        const sparse = { range: false, positions, values: Float32Array.of(1, 2, 3, 4), firstPosition: 3 };
        await conv.convert(sparse as never);
        // The window moves back to the start for a dense chunk after the sparse one reached the end.
        const dense = { range: true, values: Float32Array.of(0.5, 0.25), firstPosition: 0 };
        await conv.convert(dense as never);
        assert.deepEqual(
          [...sparse.values],
          [...positions].map((p, i) => Math.fround(i + 1 - f32[p]!)),
          dtype,
        );
        assert.deepEqual([...dense.values], [Math.fround(0.5 - f32[0]!), Math.fround(0.25 - f32[1]!)], dtype);
      } finally {
        await base.close();
      }
    }
    const path = join(dir, 'conv-huge');
    await writeCheckpoint(path, [
      { name: 'w', dtype: 'F32', shape: [2], data: encodeFromF32(Float32Array.of(1, 3e38), 'F32') },
    ]);
    const base = await Checkpoint.open(path);
    try {
      const chunk = { range: true, values: Float32Array.of(1, -3e38), firstPosition: 0 };
      await assert.rejects(new FinetunedToDelta(base, 'w').convert(chunk as never), (err: Error) => {
        assert.ok(err instanceof FormatError);
        assert.match(
          err.message,
          /flat position 1: the fine-tuned weight -3\S* minus the base weight 3\S* is not a finite fp32 number/,
        );
        return true;
      });
    } finally {
      await base.close();
    }
  });
});
