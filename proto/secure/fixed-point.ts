/**
 * Fixed-point coding in Z_2^32. A job fixes a clipping bound B and its number
 * of parties n at creation; the scale is the power of two 2^k with
 * n·(B·2^k + ½) < 2^31 − 1, so the sum of n encoded values never wraps and
 * decodes as a signed 32-bit integer divided by 2^k, exactly. Each value is
 * clipped to [−B, B] (and counted) and rounded to the nearest step 2^−k: an
 * unclipped value is off by at most 2^−(k+1), the decoded sum by n·2^−(k+1).
 */
import { FixedPointError } from './errors.js';

const INT31 = 2 ** 31 - 1;
/** The range of k for which 2^k is a finite, non-zero double. */
const MIN_K = -1074;
const MAX_K = 1023;

/** The fixed-point coding of a job. */
export interface FixedPoint {
  /** Clipping bound B: values are clipped to [−B, B]. */
  bound: number;
  /** Number of parties n whose values are summed. */
  parties: number;
  /** k: a value x is coded as round(x·2^k). */
  scaleBits: number;
}

/**
 * The coding for bound `bound` and `parties` parties.
 * @throws FixedPointError if the bound is not a positive finite number, the party count not a positive
 *   integer, or no power-of-two scale 2^k (a finite double) fits them
 */
export function fixedPoint(bound: number, parties: number): FixedPoint {
  if (!(Number.isFinite(bound) && bound > 0))
    throw new FixedPointError(`bound: expected a positive finite number, got ${bound}`);
  if (!(Number.isInteger(parties) && parties >= 1))
    throw new FixedPointError(`parties: expected a positive integer, got ${parties}`);
  const fits = (k: number): boolean => parties * (bound * 2 ** k + 0.5) < INT31;
  const none = (): FixedPointError => new FixedPointError(`bound ${bound}: no usable scale for ${parties} parties`);
  // n·½ alone must stay below 2^31 − 1; the estimate is taken in logs so a tiny bound cannot overflow it.
  const headroom = INT31 / parties - 0.5;
  if (!(headroom > 0)) throw none();
  let k = Math.floor(Math.log2(headroom) - Math.log2(bound));
  // 2^k must be a finite, non-zero double (the estimate may be one off; the loops below settle it).
  if (!Number.isFinite(k) || k < MIN_K - 1 || k > MAX_K + 1) throw none();
  k = Math.min(Math.max(k, MIN_K), MAX_K);
  while (k >= MIN_K && !fits(k)) k--;
  while (k < MAX_K && fits(k + 1)) k++;
  // At k = 1023 a finer scale 2^1024 is no double, but it may still fit: then k would not be the largest.
  const finerFits = k === MAX_K && parties * (bound * 2 ** MAX_K * 2 + 0.5) < INT31;
  if (k < MIN_K || !fits(k) || finerFits) throw none();
  return { bound, parties, scaleBits: k };
}

/** The step 2^−k between two coded values. */
export function stepOf(fp: FixedPoint): number {
  return 2 ** -fp.scaleBits;
}

/** The largest error of a decoded sum of n unclipped values: n·2^−(k+1). */
export function sumErrorBound(fp: FixedPoint): number {
  return (fp.parties * stepOf(fp)) / 2;
}

/** Words coding some values, and how many of them were clipped to the bound. */
export interface Encoded {
  words: Uint32Array;
  clipped: number;
}

/**
 * Codes `values` (into `into` if given, same length).
 * @throws FixedPointError on NaN (±∞ are clipped like any value beyond the bound)
 */
export function encodeFixed(values: ArrayLike<number>, fp: FixedPoint, into = new Uint32Array(values.length)): Encoded {
  if (into.length !== values.length)
    throw new RangeError(`encodeFixed: output length ${into.length}, ${values.length} values`);
  const scale = 2 ** fp.scaleBits;
  const { bound } = fp;
  let clipped = 0;
  for (let i = 0; i < values.length; i++) {
    let x = values[i]!;
    if (x > bound) {
      x = bound;
      clipped++;
    } else if (x < -bound) {
      x = -bound;
      clipped++;
    } else if (Number.isNaN(x)) {
      throw new FixedPointError(`value ${i} is NaN`);
    }
    // Storing a negative integer in a Uint32Array keeps its two's complement.
    into[i] = Math.round(x * scale);
  }
  return { words: into, clipped };
}

/** Decodes a sum of at most n coded vectors (into `into` if given, same length). */
export function decodeSum(words: Uint32Array, fp: FixedPoint): Float64Array;
export function decodeSum<T extends Float32Array | Float64Array>(words: Uint32Array, fp: FixedPoint, into: T): T;
export function decodeSum(
  words: Uint32Array,
  fp: FixedPoint,
  into?: Float32Array | Float64Array,
): Float32Array | Float64Array {
  const out = into ?? new Float64Array(words.length);
  if (out.length !== words.length)
    throw new RangeError(`decodeSum: output length ${out.length}, ${words.length} words`);
  const step = stepOf(fp);
  for (let i = 0; i < words.length; i++) out[i] = (words[i]! | 0) * step;
  return out;
}
