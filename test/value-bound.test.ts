import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { decodeToF32, encodeFromF32, type Dtype } from '../proto/safetensors/index.js';
import { firstValueBeyond, magnitudeLimit } from '../proto/sparse/index.js';
import { firstValueBeyondBytewise } from '../proto/sparse/value-bound.js';

/** The value of magnitude bits `bits` in `dtype`. */
function valueOf(dtype: Dtype, bits: number): number {
  const bytes = new Uint8Array(dtype === 'F32' ? 4 : 2);
  const view = new DataView(bytes.buffer);
  if (dtype === 'F32') view.setUint32(0, bits, true);
  else view.setUint16(0, bits, true);
  return decodeToF32(bytes, dtype)[0]!;
}

describe('value bound on stored bits', () => {
  it('finds the largest value of each precision at most the bound', () => {
    for (const dtype of ['BF16', 'F16', 'F32'] as const) {
      for (const bound of [1000, 1e-3, 0.1, 1, 3.3, 65504, 1e30]) {
        const limit = magnitudeLimit(dtype, bound);
        const at = valueOf(dtype, limit);
        assert.ok(at <= bound, `${dtype} ${bound}: ${at}`);
        // The next pattern is above the bound, or is Inf once every finite value is allowed.
        assert.ok(valueOf(dtype, limit + 1) > bound, `${dtype} ${bound}: next ${valueOf(dtype, limit + 1)}`);
      }
    }
    assert.equal(valueOf('BF16', magnitudeLimit('BF16', 1000)), 1000);
    assert.equal(valueOf('F16', magnitudeLimit('F16', 1e30)), 65504);
    assert.equal(valueOf('F32', magnitudeLimit('F32', Infinity)), 3.4028234663852886e38);
  });

  it('flags the first NaN, ±Inf or out-of-bound value at any byte offset, of either sign', () => {
    for (const dtype of ['BF16', 'F16', 'F32'] as const) {
      const limit = magnitudeLimit(dtype, 1000);
      const ok = Float32Array.of(0, -0, 1e-3, -1000, 1000, 999, -1e-30);
      const size = dtype === 'F32' ? 4 : 2;
      const padded = new Uint8Array(1 + ok.length * size);
      padded.set(encodeFromF32(ok, dtype), 1);
      assert.equal(firstValueBeyond(padded.subarray(1), dtype, limit), -1, dtype);
      for (const bad of [NaN, Infinity, -Infinity, -1e38, 1100, -2000]) {
        const values = Float32Array.of(...ok, bad, 0);
        assert.equal(firstValueBeyond(encodeFromF32(values, dtype), dtype, limit), ok.length, `${dtype} ${bad}`);
      }
    }
  });
});

describe('value bound over long runs', () => {
  it('agrees with the decoded values at every offset, parity, block and 64 KiB piece boundary, as does the bytewise path', () => {
    // A cheap PRNG, so that a failure reproduces.
    let seed = 12345;
    const random = (): number => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32;
    for (const dtype of ['BF16', 'F16', 'F32'] as const) {
      const bound = 3.5;
      const limit = magnitudeLimit(dtype, bound);
      const size = dtype === 'F32' ? 4 : 2;
      // Unaligned values are checked 64 KiB (32768 16-bit or 16384 32-bit values) at a time.
      for (const count of [1, 2, 3, 8191, 8192, 8193, 20001, 32769, 70001]) {
        const values = new Float32Array(count);
        for (let i = 0; i < count; i++) values[i] = (random() - 0.5) * 2 * bound;
        // Where a bad value goes: nowhere, the first, the last, either lane of a word, and across 4096-word blocks.
        const atPieces = [16383, 16384, 32767, 32768, 65536];
        for (const at of [-1, 0, count - 1, Math.floor(count / 2), 8192, 8193, 16385, ...atPieces].filter(
          (a) => a < count,
        )) {
          const v = values.slice();
          if (at >= 0) v[at] = [NaN, Infinity, -5, 3.75][at % 4]!;
          const encoded = encodeFromF32(v, dtype);
          // Independently: the first index whose stored value decodes to a magnitude over the bound (or NaN).
          const decoded = decodeToF32(encoded, dtype);
          const expected = decoded.findIndex((x) => !(Math.abs(x) <= bound));
          for (const offset of [0, 1, 2, 3]) {
            const padded = new Uint8Array(offset + count * size);
            padded.set(encoded, offset);
            assert.equal(
              firstValueBeyond(padded.subarray(offset), dtype, limit),
              expected,
              `${dtype} count ${count} bad at ${at} offset ${offset}`,
            );
            assert.equal(
              firstValueBeyondBytewise(padded.subarray(offset), dtype, limit),
              expected,
              `bytewise: ${dtype} count ${count} bad at ${at} offset ${offset}`,
            );
          }
        }
      }
    }
  });
});
