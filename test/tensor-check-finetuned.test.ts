// The upload's bound on fine-tuned weights is a bound on F − B (server/uploads/tensor-check.ts), on real files:
// a small |F| against a large base weight is refused, a large |F| near its base weight is taken, and a base
// weight that is not finite is left to the merge (the base's fault).
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../proto/gen/dppa/v1/sparse.js';
import { Checkpoint, encodeFromF32, writeCheckpoint } from '../proto/safetensors/index.js';
import { encodeChunks, TensorAssembler } from '../proto/sparse/index.js';
import { ContentRules } from '../server/uploads/tensor-check.js';

const BOUND = 1000;
let dir: string;
let base: Checkpoint;
let run = 0;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-tensor-check-'));
  const tensors = [
    // Every weight within a quarter of the bound: the check's shortcut applies.
    { name: 'small', values: [0.5, -0.25, 1, 0] },
    // One weight far beyond: F − B must be formed.
    { name: 'large', values: [900, 0, -600, 0] },
    { name: 'inf', values: [Infinity, 0, 0, 0] },
  ];
  await writeCheckpoint(
    join(dir, 'base'),
    tensors.map((t) => ({
      name: t.name,
      dtype: 'BF16',
      shape: [4],
      data: encodeFromF32(Float32Array.from(t.values), 'BF16'),
    })),
  );
  base = await Checkpoint.open(join(dir, 'base'));
});
after(async () => {
  await base.close();
  await rm(dir, { recursive: true, force: true });
});

/** Checks one chunk of fine-tuned weights `f` of tensor `name` (every position) against the bound. */
async function check(name: string, f: number[]): Promise<void> {
  const plan = {
    name,
    shape: [4n],
    kind: TensorKind.TENSOR_KIND_OUTSIDE,
    layer: -1,
    levelRates: [0.9],
    sent: true,
    baseSha256: new Uint8Array(0),
  };
  const header: DeltaHeader = {
    formatVersion: 2,
    baseFingerprint: '',
    method: 'dp',
    rate: 0.9,
    levels: [0.9],
    options: {},
    valueDtype: ValueDtype.VALUE_DTYPE_BF16,
    tensors: [plan],
    producer: '',
    pruneMethod: 0,
    outside: 0,
    valueKind: ValueKind.VALUE_KIND_FINETUNED,
  };
  // A key of its own per check: nothing remembered from another case.
  const t = new ContentRules(header, BOUND, base, `case-${run++}`).tensor(plan);
  const asm = new TensorAssembler({ entries: 'stream', maxPartition: 1, values: false });
  asm.push({ tensorBegin: { name, shape: plan.shape } });
  const [chunk] = [
    ...encodeChunks(name, 0, Float64Array.from([0, 1, 2, 3]), Float32Array.from(f), {
      valueDtype: ValueDtype.VALUE_DTYPE_BF16,
      numel: 4,
    }),
  ];
  await t.chunk(chunk!, asm.push({ chunk: chunk! })!);
}

describe('the bound on fine-tuned weights', () => {
  it('takes weights whose difference from the base fits, however large |F|', async () => {
    await check('small', [1, -1, 2, 0.5]);
    await check('large', [1800, 0.5, -1500, 999]);
  });

  it('refuses a small |F| whose difference from a large base weight exceeds the bound, naming F and F − B', async () => {
    await assert.rejects(
      check('large', [-200, 0, 0, 0]),
      /position 0 is -200 \(a fine-tuned weight, -1100 from the base's\); deltas must have magnitude at most 1000/,
    );
    // bf16(1010) = 1008: beyond the bound with B = 0.
    await assert.rejects(
      check('small', [0, 0, 0, 1010]),
      /position 3 is 1008 \(a fine-tuned weight, 1008 from the base's\)/,
    );
  });

  it('leaves a base weight that is not finite to the merge', async () => {
    await check('inf', [1, 0, 0, 0]);
  });
});
