// The dense merge's F − B kernels (FinetunedToDelta.addScaled through windows or kept bf16 bit patterns,
// addScaledOverBase reading B from the accumulator) give bit for bit the sums of an independent fp32 computation and
// of convert + addChunkScaled: 3 parties, BF16/F16/F32 bases over 1 Mi elements (more than one window), sparse and
// RANGE chunks across window boundaries; a non-finite F − B from a later party is refused. And the merge reads B
// from the accumulator only in the first party's first partition: a position repeated in a later partition (a
// spool from an older server) still gets B from the base. Accumulators: base bits kept only when read, within the
// keep limit, and the smallest kept accumulator that fits is reused.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BaseDeltaError } from '../proto/errors.js';
import { DeltaHeader, ValueDtype, ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { Checkpoint, decodeToF32, encodeFromF32, writeCheckpoint, type Dtype } from '../proto/safetensors/index.js';
import { addChunkScaled, DeltaFileWriter, FinetunedToDelta, tensorRecords } from '../proto/sparse/index.js';
import type { DecodedChunk } from '../proto/sparse/chunk-codec.js';
import { AccumulatorPool } from '../server/merge/merge-runner.js';
import {
  ACCUMULATOR_KEPT_MAX_BYTES,
  accumulateTensor,
  accumulatorElements,
  type TensorTask,
} from '../server/merge/tensor-merge.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-kernels-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const W = 1 << 20; // the window size of FinetunedToDelta
const N = W + 4099;

const sparse = (positions: number[], values: number[]): DecodedChunk =>
  ({
    range: false,
    positions: Float64Array.from(positions),
    values: Float32Array.from(values),
    firstPosition: positions[0]!,
  }) as unknown as DecodedChunk;
const range = (first: number, values: number[]): DecodedChunk =>
  ({ range: true, values: Float32Array.from(values), firstPosition: first }) as unknown as DecodedChunk;

/** Fine-tuned values near the base: b + small steps, some far away. */
const near = (b: Float32Array, ps: number[], k: number): number[] =>
  ps.map((p, i) => (i % 7 === 0 ? (i + k) * 1.7 : b[p]! + ((i * 31 + k) % 13) / 97 - 0.06));

/** Each party's chunks with its scale; the first party keeps each position once (strictly increasing). */
function parties(b: Float32Array): { scale: number; chunks: DecodedChunk[] }[] {
  const aroundWindow = (from: number, step: number, count: number): number[] =>
    Array.from({ length: count }, (_, i) => from + i * step);
  const p1 = aroundWindow(W - 300, 17, 40); // crosses W
  const r1 = W + 500; // after p1's last position
  const p2 = [0, 1, 5, W - 1, W, W + 1, N - 1];
  const p3 = aroundWindow(3, 9650, 110); // spans both windows
  return [
    { scale: 0.3, chunks: [sparse(p1, near(b, p1, 1)), range(r1, near(b, aroundWindow(r1, 1, 64), 2))] },
    {
      scale: 1.25,
      chunks: [range(W - 20, near(b, aroundWindow(W - 20, 1, 50), 3)), sparse(p2, near(b, p2, 4))],
    },
    { scale: -0.7, chunks: [sparse(p3, near(b, p3, 5)), range(N - 30, near(b, aroundWindow(N - 30, 1, 30), 6))] },
  ];
}

function clone(c: DecodedChunk): DecodedChunk {
  return c.range ? range(c.firstPosition, [...c.values]) : sparse([...c.positions], [...c.values]);
}

/** The first position where two fp32 arrays differ bit for bit, or -1. */
function firstDifference(a: Float32Array, b: Float32Array): number {
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return x.length === y.length ? -1 : x.length;
}

async function baseOf(dtype: Dtype, b32: Float32Array, name: string): Promise<{ base: Checkpoint; b: Float32Array }> {
  const bytes = encodeFromF32(b32, dtype);
  const path = join(dir, name);
  await writeCheckpoint(path, [{ name: 'w', dtype, shape: [b32.length], data: bytes }]);
  return { base: await Checkpoint.open(path), b: decodeToF32(bytes, dtype) };
}

const bitsOf = (base: Checkpoint, dtype: Dtype): Promise<Uint16Array | undefined> =>
  dtype === 'BF16'
    ? base.readRawRange('w', 0, N * 2).then((raw) => new Uint16Array(Uint8Array.from(raw).buffer))
    : Promise.resolve(undefined);

describe('FinetunedToDelta kernels', () => {
  for (const dtype of ['BF16', 'F16', 'F32'] as const) {
    it(`addScaled (windows${dtype === 'BF16' ? ', base bits' : ''}) and addScaledOverBase agree bit for bit with convert + add, ${dtype}`, async () => {
      const b32 = new Float32Array(N);
      for (let i = 0; i < N; i++) b32[i] = ((i % 251) - 125) / 37 + (i % 3) * 1e-3;
      const { base, b } = await baseOf(dtype, b32, `base-${dtype}`);
      try {
        const ps = parties(b);
        // Independent: d = fround(F − B) from the decoded base, each sum rounded once to fp32.
        const want = Float32Array.from(b);
        for (const { scale, chunks } of ps)
          for (const c of chunks)
            for (let i = 0; i < c.values.length; i++) {
              const p = c.range ? c.firstPosition + i : c.positions[i]!;
              want[p] = Math.fround(want[p]! + scale * Math.fround(c.values[i]! - b[p]!));
            }
        // convert + addChunkScaled.
        const converted = Float32Array.from(b);
        const conv = new FinetunedToDelta(base, 'w');
        for (const { scale, chunks } of ps)
          for (const c of chunks) {
            const copy = clone(c);
            await conv.convert(copy);
            addChunkScaled(converted, copy, scale);
          }
        assert.equal(firstDifference(converted, want), -1, 'convert + add');

        const bits = await bitsOf(base, dtype);
        const ways: [string, Uint16Array | undefined, boolean][] = [
          ['windows', undefined, false],
          ['windows, over base', undefined, true],
        ];
        if (bits !== undefined) ways.push(['bits', bits, false], ['bits, over base', bits, true]);
        for (const [way, kept, overBase] of ways) {
          const acc = Float32Array.from(b);
          for (const [k, { scale, chunks }] of ps.entries()) {
            // Later parties: one converter each, as the merge makes; windows move back and forth.
            const toDelta = new FinetunedToDelta(base, 'w', undefined, kept);
            for (const c of chunks) {
              const before = [...c.values];
              if (overBase && k === 0) toDelta.addScaledOverBase(acc, c, scale);
              else await toDelta.addScaled(acc, c, scale);
              assert.deepEqual([...c.values], before, `${way}: the chunk is left unchanged`);
            }
          }
          assert.equal(firstDifference(acc, want), -1, way);
        }
      } finally {
        await base.close();
      }
    });
  }

  it('refuses a non-finite F − B from a later party, whatever the way B is read', async () => {
    for (const dtype of ['BF16', 'F32'] as const) {
      const b32 = new Float32Array(N).fill(0.5);
      const q = W + 3;
      b32[q] = 3e38;
      const { base, b } = await baseOf(dtype, b32, `huge-${dtype}`);
      try {
        const bits = await bitsOf(base, dtype);
        for (const kept of bits === undefined ? [undefined] : [undefined, bits]) {
          const acc = Float32Array.from(b);
          new FinetunedToDelta(base, 'w', undefined, kept).addScaledOverBase(acc, range(W - 2, [1, 2]), 1);
          const later = new FinetunedToDelta(base, 'w', undefined, kept);
          for (const chunk of [sparse([4, q], [1, -3e38]), range(q - 1, [1, -3e38])])
            await assert.rejects(later.addScaled(acc, chunk, 0.5), (err: Error) => {
              assert.ok(err instanceof BaseDeltaError, String(err));
              assert.match(err.message, new RegExp(`flat position ${q}: the fine-tuned weight -3\\S* minus`));
              return true;
            });
          assert.equal(acc[q], b[q]);
        }
      } finally {
        await base.close();
      }
    }
  });
});

describe('accumulateTensor over a first party with several partitions', () => {
  it('reads B from the base, not the accumulator, for a position repeated in a later partition', async () => {
    const n = 64;
    const b32 = Float32Array.from({ length: n }, (_, i) => 1 + i / 8);
    const { base, b } = await baseOf('F32', b32, 'repeat');
    try {
      const spool = join(dir, 'repeat.dppa');
      const header = DeltaHeader.fromPartial({
        formatVersion: 2,
        method: 'dp',
        rate: 0.9,
        levels: [0.95, 0.9],
        valueDtype: ValueDtype.VALUE_DTYPE_F32,
        valueKind: ValueKind.VALUE_KIND_FINETUNED,
        tensors: [{ name: 'w', shape: [BigInt(n)], layer: 0, levelRates: [0.9, 0.9], sent: true }],
        producer: 'test',
      });
      const none = { positions: new Float64Array(0), values: new Float32Array(0) };
      const p1 = { positions: Float64Array.of(3, 5, 9), values: Float32Array.of(4, 7.5, -2) };
      const p2 = { positions: Float64Array.of(5, 20), values: Float32Array.of(9.25, 0.75) };
      const writer = await DeltaFileWriter.create(spool);
      await writer.write({ header });
      for (const r of tensorRecords('w', [n], [none, p1, p2], { valueDtype: ValueDtype.VALUE_DTYPE_F32 }))
        await writer.write(r);
      await writer.close();
      const [c, f1, f2] = [0.5, 2, 3];
      const task = {
        name: 'w',
        contributions: [{ party: 'a', file: spool, weight: c, factors: [f1, f2] }],
        outsideByMax: false,
      };
      const acc = await accumulateTensor(base, task, new Float32Array(n));
      const want = Float32Array.from(b);
      for (const [f, part] of [
        [f1, p1],
        [f2, p2],
      ] as const)
        part.positions.forEach((p, i) => {
          want[p] = Math.fround(want[p]! + c * f * Math.fround(part.values[i]! - b[p]!));
        });
      assert.equal(firstDifference(acc, want), -1);
    } finally {
      await base.close();
    }
  });
});

describe('accumulators', () => {
  const task = (finetuned: (boolean | undefined)[]): TensorTask => ({
    name: 'w',
    outsideByMax: false,
    contributions: finetuned.map((f, i) => ({
      party: `p${i}`,
      file: 'none',
      weight: 1,
      factors: [1],
      ...(f === undefined ? {} : { finetuned: f }),
    })),
  });

  it('keep the base bits only when a party after the first sends fine-tuned values, and fit the keep limit', () => {
    const numel = (ACCUMULATOR_KEPT_MAX_BYTES / 4) * (2 / 3); // the largest BF16 tensor keeping its bits
    const info = { dtype: 'BF16', numel, byteLength: numel * 2 };
    const withBits = numel + numel / 2;
    assert.equal(accumulatorElements(info, task([true, true])), withBits);
    assert.equal(accumulatorElements(info, task([false, undefined])), withBits);
    assert.equal(accumulatorElements(info, task([true, false, false])), numel);
    assert.equal(accumulatorElements(info, task([true])), numel);
    assert.equal(accumulatorElements({ ...info, dtype: 'F16' }, task([true, true])), numel);
    assert.equal(withBits * 4, ACCUMULATOR_KEPT_MAX_BYTES);
    const pool = new AccumulatorPool();
    pool.give(new ArrayBuffer(withBits * 4));
    assert.equal(pool.take(withBits).length, withBits, 'kept, not fresh memory');
  });

  it('hand out the smallest kept accumulator that fits', () => {
    const pool = new AccumulatorPool();
    for (const n of [1000, 10, 100]) pool.give(new ArrayBuffer(n * 4)); // two kept: 1000 and 100
    assert.equal(pool.take(50).length, 100);
    assert.equal(pool.take(50).length, 1000);
    assert.equal(pool.take(50).length, 50);
  });
});
