/**
 * Finds a stored value that is not finite or exceeds a bound, on the stored bits: two 16-bit values per integer
 * operation. See docs/design/sparse-chunks.md.
 */
import { bytesPerElement, decodeToF32, type Dtype } from '../safetensors/dtype.js';

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Largest magnitude bit pattern of a finite value: exponent all ones minus one, mantissa all ones. */
const MAX_FINITE_BITS: Record<Dtype, number> = { F32: 0x7f7fffff, F16: 0x7bff, BF16: 0x7f7f };

/**
 * Magnitude bits of the largest finite value of `dtype` at most `bound`.
 * @param bound - Largest magnitude allowed, > 0; Infinity allows every finite value.
 */
export function magnitudeLimit(dtype: Dtype, bound: number): number {
  const size = bytesPerElement(dtype);
  const bytes = new Uint8Array(size);
  const view = new DataView(bytes.buffer);
  const value = (bits: number): number => {
    if (size === 2) view.setUint16(0, bits, true);
    else view.setUint32(0, bits, true);
    return decodeToF32(bytes, dtype)[0]!;
  };
  // Binary search of the largest pattern whose value is ≤ bound (patterns 0 … max finite are increasing).
  let lo = 0;
  let hi = MAX_FINITE_BITS[dtype];
  while (lo < hi) {
    const mid = lo + Math.ceil((hi - lo) / 2);
    if (value(mid) <= bound) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/**
 * The index of the first stored value whose magnitude bits exceed `limit`
 * (from {@link magnitudeLimit}): NaN, ±Inf or beyond the bound.
 * @param bytes - Little-endian values of `dtype`, any alignment.
 * @returns The index, or -1 when every value is within the limit.
 */
export function firstValueBeyond(bytes: Uint8Array, dtype: Dtype, limit: number): number {
  if (!LITTLE_ENDIAN) return firstValueBeyondBytewise(bytes, dtype, limit);
  if (bytes.byteOffset % 4 === 0) return firstValueBeyondAligned(bytes, dtype, limit);
  // Not 4-byte aligned: copied a piece at a time into fixed scratch memory.
  const size = bytesPerElement(dtype);
  for (let at = 0; at < bytes.length; at += PIECE_BYTES) {
    const piece = bytes.subarray(at, at + PIECE_BYTES);
    scratch.set(piece);
    const i = firstValueBeyondAligned(scratch.subarray(0, piece.length), dtype, limit);
    if (i >= 0) return at / size + i;
  }
  return -1;
}

/** Bytes of unaligned values copied at a time (a multiple of 4: whole values and 32-bit words). */
const PIECE_BYTES = 64 * 1024;
const scratch = new Uint8Array(PIECE_BYTES);

/** {@link firstValueBeyond} of 4-byte aligned `bytes`. */
function firstValueBeyondAligned(bytes: Uint8Array, dtype: Dtype, limit: number): number {
  if (dtype === 'F32') {
    const n = bytes.length >>> 2;
    const words = new Int32Array(bytes.buffer, bytes.byteOffset, n);
    for (let i = 0; i < n; i++) if ((words[i]! & 0x7fffffff) > limit) return i;
    return -1;
  }
  // Two 16-bit values per word. Adding 0x7fff − limit to a 15-bit magnitude sets its lane's bit 15 exactly when the
  // magnitude exceeds the limit, and cannot carry into the other lane; a block's results are OR-ed, tested once.
  const n = bytes.length >>> 1;
  const pairs = n >>> 1;
  const words = new Int32Array(bytes.buffer, bytes.byteOffset, pairs);
  const k = ((0x7fff - limit) * 0x10001) | 0;
  for (let from = 0; from < pairs; from += BLOCK_WORDS) {
    const to = Math.min(pairs, from + BLOCK_WORDS);
    let acc = 0;
    let i = from;
    for (; i + 3 < to; i += 4) {
      acc |=
        ((words[i]! & 0x7fff7fff) + k) |
        ((words[i + 1]! & 0x7fff7fff) + k) |
        ((words[i + 2]! & 0x7fff7fff) + k) |
        ((words[i + 3]! & 0x7fff7fff) + k);
    }
    for (; i < to; i++) acc |= (words[i]! & 0x7fff7fff) + k;
    if ((acc & 0x80008000) !== 0) return firstBeyond16(words, from * 2, to * 2, limit);
  }
  if (n % 2 === 1 && (bytes[2 * n - 2]! | ((bytes[2 * n - 1]! & 0x7f) << 8)) > limit) return n - 1;
  return -1;
}

/** Words tested between two checks of the accumulated lanes. */
const BLOCK_WORDS = 4096;

/** The first 16-bit value of values `from` … `to − 1` (of 32-bit words `words`, little-endian) over `limit`, or -1. */
function firstBeyond16(words: Int32Array, from: number, to: number, limit: number): number {
  for (let i = from; i < to; i++) {
    const w = words[i >>> 1]!;
    if (((i & 1) === 0 ? w & 0x7fff : (w >>> 16) & 0x7fff) > limit) return i;
  }
  return -1;
}

/**
 * {@link firstValueBeyond} a byte at a time: what big-endian hosts run; exported for its test only.
 * @internal
 */
export function firstValueBeyondBytewise(bytes: Uint8Array, dtype: Dtype, limit: number): number {
  if (dtype === 'F32') {
    for (let i = 0, at = 0; at + 3 < bytes.length; i++, at += 4) {
      const mag = bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | ((bytes[at + 3]! & 0x7f) << 24);
      if (mag > limit) return i;
    }
    return -1;
  }
  const n = bytes.length >>> 1;
  for (let i = 0, at = 0; i < n; i++, at += 2) {
    if ((bytes[at]! | ((bytes[at + 1]! & 0x7f) << 8)) > limit) return i;
  }
  return -1;
}

/**
 * A job's max_abs_value when it sets none: real fine-tunes' deltas stay near 1 at most, DARE rescales by up to 100
 * (drop rate 0.99); the reasoning is in docs/server.md ("What an upload must satisfy"). The client sends deltas, not
 * fine-tuned weights, to a job bounded more tightly.
 */
export const DEFAULT_MAX_ABS_VALUE = 1000;
