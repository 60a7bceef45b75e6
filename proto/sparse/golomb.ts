/**
 * Golomb coding of the gaps between successive kept positions, exact for tensors beyond 2^32 elements.
 * See docs/design/position-coding.md.
 */
import { BitReader, BitWriter } from './bit-io.js';
import { decodeGapsFast, FAST_MAX_REMAINDER_BITS } from './golomb-fast.js';

/**
 * Largest Golomb parameter used or accepted. Keeps remainders within 31 bits;
 * the cost is a longer unary part only for chunks sparser than about one entry
 * in 3·10^9 positions.
 */
export const MAX_GOLOMB_M = 2 ** 31;

/**
 * The Golomb parameter for a chunk: the optimal m for a geometric gap source
 * with density p = count / span, m = ⌈log(2 − p) / −log(1 − p)⌉.
 *
 * @param count - Entries in the chunk, at least 1.
 * @param span - Positions covered, last − first + 1, at least `count`.
 * @returns m, between 1 and {@link MAX_GOLOMB_M}.
 */
export function golombParameter(count: number, span: number): number {
  if (!(count >= 1) || !(span > count)) return 1;
  const p = count / span;
  // log1p keeps −log(1 − p) accurate when p is tiny.
  const m = Math.ceil(Math.log(2 - p) / -Math.log1p(-p));
  return Math.min(Math.max(m, 1), MAX_GOLOMB_M);
}

/** Bits of the truncated-binary remainder code: b = ⌈log2 m⌉ and threshold u = 2^b − m. */
function remainderCode(m: number): { b: number; u: number } {
  const b = m === 1 ? 0 : 32 - Math.clz32(m - 1);
  return { b, u: 2 ** b - m };
}

/**
 * The fewest bits one gap takes: the zero ending its unary part plus the
 * shorter remainder code, b − 1 bits (none when m = 1).
 *
 * @param m - Golomb parameter.
 */
export function minGapBits(m: number): number {
  return Math.max(remainderCode(m).b, 1);
}

/**
 * Upper bound on the bytes {@link encodeGaps} writes, exact enough to size its
 * buffer once: Σ⌊gᵢ/m⌋ ≤ ⌊Σgᵢ/m⌋, and every gap takes at most 1 + b further bits.
 *
 * @param gaps - Number of gaps (count − 1).
 * @param gapSum - Sum of the coded values g − 1 over all gaps.
 * @param m - Golomb parameter.
 */
export function gapBytesBound(gaps: number, gapSum: number, m: number): number {
  const { b } = remainderCode(m);
  return Math.ceil((Math.floor(gapSum / m) + gaps * (1 + b)) / 8) + 1;
}

/**
 * Golomb-codes the gaps of `positions[start..end)`.
 *
 * Preconditions (checked by the caller, which can name the tensor): positions
 * are integers, strictly increasing, below 2^53.
 *
 * @param positions - Flat positions.
 * @param start - Index of the first position of the chunk (not itself coded).
 * @param end - One past the last position of the chunk.
 * @param m - Golomb parameter, 1 to {@link MAX_GOLOMB_M}.
 * @returns The bit stream, zero-padded to a byte; empty when there is no gap.
 */
export function encodeGaps(positions: Float64Array, start: number, end: number, m: number): Uint8Array {
  const gaps = end - start - 1;
  if (gaps <= 0) return new Uint8Array(0);
  const first = positions[start]!;
  const last = positions[end - 1]!;
  const writer = new BitWriter(gapBytesBound(gaps, last - first - gaps, m));
  const { b, u } = remainderCode(m);
  let prev = first;
  for (let i = start + 1; i < end; i++) {
    const cur = positions[i]!;
    const g = cur - prev - 1;
    prev = cur;
    let q = Math.floor(g / m);
    let r = g - q * m;
    // For g < 2^53 the rounded quotient never exceeds ⌊g/m⌋ (doubles near
    // g/m are spaced below 2/m), but a negative remainder would silently
    // corrupt the stream, so one compare buys certainty.
    if (r < 0) {
      q--;
      r += m;
    }
    if (q + b < 24) {
      // Common case: unary and remainder fit one write.
      if (r < u) writer.write((((1 << q) - 1) << b) | r, q + b);
      else writer.write((((1 << q) - 1) << (b + 1)) | (r + u), q + 1 + b);
    } else {
      writer.writeUnary(q);
      if (r < u) writer.writeWide(r, b - 1);
      else writer.writeWide(r + u, b);
    }
  }
  return writer.finish();
}

/** How decoding the gap stream ended, for the caller to turn into a named error. */
export type GapDecodeStatus = 'ok' | 'truncated' | 'trailing-data';

/**
 * Decodes `out.length − 1` gaps into `out[1..]`, starting from `out[0]`.
 *
 * Never throws on bad input: a stream too short for the gaps it must hold, or
 * one with non-zero bits after them, is reported through the status so the
 * caller can raise an error naming the tensor. Positions above 2^53 are not
 * detected here; the caller checks the last one.
 *
 * @param bytes - The bit stream.
 * @param m - Golomb parameter, 1 to {@link MAX_GOLOMB_M}.
 * @param out - Receives the positions; `out[0]` must hold the first position.
 */
export function decodeGaps(bytes: Uint8Array, m: number, out: Float64Array): GapDecodeStatus {
  const { b, u } = remainderCode(m);
  if (b <= FAST_MAX_REMAINDER_BITS) return decodeGapsFast(bytes, m, { b, u }, out);
  // Parameters above 2^25 (chunks sparser than about one entry in 2·10^7 positions): remainders read in two parts.
  const reader = new BitReader(bytes);
  let pos = out[0]!;
  for (let i = 1; i < out.length; i++) {
    const q = reader.readUnary();
    let r = 0;
    if (b > 0) {
      r = reader.readWide(b - 1);
      if (r >= u) r = r * 2 + reader.read(1) - u;
    }
    pos += q * m + r + 1;
    out[i] = pos;
  }
  const consumed = reader.consumedBits;
  if (consumed > reader.totalBits) return 'truncated';
  if (reader.totalBits - consumed >= 8 || !reader.restIsZero()) return 'trailing-data';
  return 'ok';
}
