/**
 * The fast Golomb gap decoder, for parameters up to 2^24: a table lookup per codeword instead of bit by bit.
 * Same contract as `decodeGaps`. See docs/design/position-coding.md.
 */
import type { GapDecodeStatus } from './golomb.js';

/** Largest remainder width b = ⌈log2 m⌉ this decoder handles: the bit-by-bit path reads b − 1 ≤ 24 bits at once. */
export const FAST_MAX_REMAINDER_BITS = 25;

/** Bits a table lookup sees. */
const PEEK = 16;
/** Largest b with a lookup table: beyond it too few codewords fit in 16 bits to pay for the table. */
const TABLE_MAX_REMAINDER_BITS = 12;
/** Tables kept per thread (256 KiB each), most recently built last. */
const CACHED_TABLES = 16;
const tables = new Map<number, Int32Array>();

/**
 * Decodes `out.length − 1` gaps into `out[1..]`, from `out[0]` on.
 * @param bytes - The bit stream.
 * @param m - Golomb parameter.
 * @param code - Its remainder code as `decodeGaps` computes it: b = ⌈log2 m⌉, at most
 *   {@link FAST_MAX_REMAINDER_BITS}, and u = 2^b − m.
 * @param out - Receives the positions; `out[0]` must hold the first position.
 */
export function decodeGapsFast(
  bytes: Uint8Array,
  m: number,
  code: { b: number; u: number },
  out: Float64Array,
): GapDecodeStatus {
  const { b, u } = code;
  const table = b <= TABLE_MAX_REMAINDER_BITS ? tableFor(m, b, u) : NO_TABLE;
  const n = bytes.length;
  // The next `bits` bits of the stream, left-aligned in `acc`; zeros beyond its end, as a truncated stream reads.
  let acc = 0;
  let bits = 0;
  let at = 0;
  let pos = out[0]!;
  const count = out.length;
  let i = 1;
  while (i < count) {
    // The hot loop: one table lookup per codeword. It is left for the rare codeword longer
    // than the table, read in a function of its own so that this loop stays small enough
    // for V8 to keep its state in registers (1.4–1.7x faster than one loop with both paths).
    for (; i < count; i++) {
      // Two bytes at once, which leaves at least 17 bits for a 16-bit lookup.
      if (bits <= 16) {
        acc |= (((at < n ? bytes[at]! : 0) << 8) | (at + 1 < n ? bytes[at + 1]! : 0)) << (16 - bits);
        at += 2;
        bits += 16;
      }
      const entry = table[acc >>> (32 - PEEK)]!;
      if (entry === 0) break;
      const length = entry & 31;
      pos += entry >>> 5;
      acc <<= length;
      bits -= length;
      out[i] = pos;
    }
    if (i === count) break;
    state[0] = acc;
    state[1] = bits;
    state[2] = at;
    pos += readCodeword(bytes, m, b, u);
    acc = state[0]!;
    bits = state[1]!;
    at = state[2]!;
    out[i++] = pos;
  }
  const consumed = at * 8 - bits;
  if (consumed > n * 8) return 'truncated';
  if (n * 8 - consumed >= 8 || (bits > 0 && acc !== 0)) return 'trailing-data';
  for (let j = at; j < n; j++) if (bytes[j] !== 0) return 'trailing-data';
  return 'ok';
}

/** Stands for "no table" (b above {@link TABLE_MAX_REMAINDER_BITS}): every lookup misses. */
const NO_TABLE = new Int32Array(1 << PEEK);

/** The decoder's bit window (acc, bits, at), handed to and from {@link readCodeword}. */
const state = new Int32Array(3);

/**
 * Reads one codeword bit by bit from the window in {@link state}, which it
 * advances. The refill is written out at each of its two places: a helper
 * closing over these locals would make V8 keep them in a context object.
 * @returns The gap, q·m + r + 1.
 */
function readCodeword(bytes: Uint8Array, m: number, b: number, u: number): number {
  const n = bytes.length;
  let acc = state[0]!;
  let bits = state[1]!;
  let at = state[2]!;
  let q = 0;
  for (;;) {
    while (bits <= 24) {
      acc |= (at < n ? bytes[at]! : 0) << (24 - bits);
      at++;
      bits += 8;
    }
    const ones = Math.clz32(~acc);
    if (ones < bits) {
      // Two shifts: a shift by 32 would be a shift by 0 in JavaScript.
      acc = (acc << ones) << 1;
      bits -= ones + 1;
      q += ones;
      break;
    }
    q += bits;
    acc = 0;
    bits = 0;
  }
  let r = 0;
  if (b > 0) {
    while (bits <= 24) {
      acc |= (at < n ? bytes[at]! : 0) << (24 - bits);
      at++;
      bits += 8;
    }
    const k = b - 1;
    if (k > 0) {
      r = acc >>> (32 - k);
      acc <<= k;
      bits -= k;
    }
    if (r >= u) {
      r = r * 2 + (acc >>> 31) - u;
      acc <<= 1;
      bits -= 1;
    }
  }
  state[0] = acc;
  state[1] = bits;
  state[2] = at;
  return q * m + r + 1;
}

/**
 * The lookup table of parameter m: for every 16-bit window that starts with a
 * whole codeword, `gap << 5 | length`; 0 where the codeword is longer.
 */
function tableFor(m: number, b: number, u: number): Int32Array {
  const cached = tables.get(m);
  if (cached !== undefined) return cached;
  const t = new Int32Array(1 << PEEK);
  for (let q = 0; q + 1 + Math.max(b - 1, 0) <= PEEK; q++) {
    const unary = ((1 << q) - 1) << 1;
    for (let r = 0; r < m; r++) {
      // Truncated binary: the first u remainders take b − 1 bits, the others b bits (as r + u).
      const short = r < u || b === 0;
      const width = b === 0 ? 0 : short ? b - 1 : b;
      const length = q + 1 + width;
      if (length > PEEK) break;
      const code = (unary << width) | (short ? r : r + u);
      const from = code << (PEEK - length);
      t.fill(((q * m + r + 1) << 5) | length, from, from + (1 << (PEEK - length)));
    }
  }
  if (tables.size >= CACHED_TABLES) tables.delete(tables.keys().next().value!);
  tables.set(m, t);
  return t;
}
