/**
 * Finds a stored value that is not finite or exceeds a bound, by one integer comparison on the stored bytes per
 * value. See docs/design/sparse-chunks.md.
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
  if (dtype === 'F32') {
    for (let i = 0, at = 0; at < bytes.length; i++, at += 4) {
      const mag = bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | ((bytes[at + 3]! & 0x7f) << 24);
      if (mag > limit) return i;
    }
    return -1;
  }
  const n = bytes.length >>> 1;
  if (bytes.byteOffset % 2 === 0 && LITTLE_ENDIAN) {
    // Aligned: one 16-bit load per value (most chunks; a received message's fields may sit at any offset).
    const u16 = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
    for (let i = 0; i < n; i++) if ((u16[i]! & 0x7fff) > limit) return i;
    return -1;
  }
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
