// The upload's bound on fine-tuned weights is a bound on F − B (server/uploads/tensor-check.ts), on real files:
// a small |F| against a large base weight is refused, a large |F| near its base weight is taken, and a base
// weight that is not finite is left to the merge (the base's fault).
import assert from 'node:assert/strict';
import { mkdtemp, open, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../proto/gen/dppa/v1/sparse.js';
import { Checkpoint, encodeFromF32, writeCheckpoint } from '../proto/safetensors/index.js';
import { encodeChunks, TensorAssembler } from '../proto/sparse/index.js';
import { BaseReadError } from '../server/errors.js';
import { createLogger } from '../server/log.js';
import { toStatus } from '../server/rpc/status.js';
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

/**
 * Checks one chunk of fine-tuned weights `f` of tensor `name` (every position) against a bound (BOUND unless told),
 * under a key of its own unless told (nothing remembered from another case), against `base` unless told.
 */
async function check(
  name: string,
  f: number[],
  opts: { bound?: number; key?: string; from?: Checkpoint } = {},
): Promise<void> {
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
  const rules = new ContentRules(header, opts.bound ?? BOUND, opts.from ?? base, opts.key ?? `case-${run++}`);
  const t = rules.tensor(plan);
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

describe('what is remembered of the base', () => {
  it('is kept per bound: a base within a quarter of 4000 is not taken as within a quarter of 1000', async () => {
    // Bound 4000: |F| = 200 and every |B| ≤ 900 are within 1000, so the shortcut takes it.
    await check('large', [-200, 0, 0, 0], { bound: 4000, key: 'per-bound' });
    // Bound 1000 under the same key: the base is not within 250, F − B = -1100 is formed and refused.
    await assert.rejects(check('large', [-200, 0, 0, 0], { key: 'per-bound' }), /-1100 from the base's/);
  });

  it('is kept per file: a base rewritten in place under the same path and key is scanned again', async () => {
    const folder = join(dir, 'rewritten');
    const file = join(folder, 'model.safetensors');
    const write = (values: number[]) =>
      writeCheckpoint(folder, [
        { name: 'w', dtype: 'BF16', shape: [4], data: encodeFromF32(Float32Array.from(values), 'BF16') },
      ]);
    await write([0, 0, 0, 0]);
    const first = await Checkpoint.open(folder);
    try {
      await check('w', [-200, 0, 0, 0], { key: 'rewritten', from: first });
    } finally {
      await first.close();
    }
    // The same bytes but for the data: rewrite the data in place (the same inode and size, a later mtime).
    const bytes = encodeFromF32(Float32Array.from([900, 0, 0, 0]), 'BF16');
    const fh = await open(file, 'r+');
    try {
      const { size } = await fh.stat();
      await new Promise((resolve) => setTimeout(resolve, 5));
      await fh.write(bytes, 0, bytes.byteLength, size - bytes.byteLength);
    } finally {
      await fh.close();
    }
    const second = await Checkpoint.open(folder);
    try {
      await assert.rejects(check('w', [-200, 0, 0, 0], { key: 'rewritten', from: second }), /-1100 from the base's/);
    } finally {
      await second.close();
    }
  });
});

describe('a base that cannot be read', () => {
  it("fails the upload as the server's fault (INTERNAL), not the party's (INVALID_ARGUMENT)", async () => {
    const folder = join(dir, 'truncated');
    const file = join(folder, 'model.safetensors');
    await writeCheckpoint(folder, [
      { name: 'w', dtype: 'BF16', shape: [4], data: encodeFromF32(Float32Array.from([900, 0, 0, 0]), 'BF16') },
    ]);
    const opened = await Checkpoint.open(folder);
    try {
      // Truncated after the job opened it: its header still says 8 bytes of data.
      const { size } = await stat(file);
      await truncate(file, size - 8);
      const err = await check('w', [-200, 0, 0, 0], { from: opened }).then(
        () => assert.fail('the check passed'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof BaseReadError, `got ${String(err)}`);
      assert.match(err.message, /^the server could not read tensor "w" of the job's base/);
      assert.equal(toStatus(err, createLogger({ level: 'silent' })).code, status.INTERNAL);
    } finally {
      await opened.close();
    }
  });
});
