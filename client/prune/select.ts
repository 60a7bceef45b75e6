/**
 * Exact, linear-time top-k selection by magnitude for several nested k at once, by radix select on float bit
 * patterns (spec "DP", step 4, and "Partitions"). See docs/design/pruning.md.
 */
import { FormatError } from '../../proto/errors.js';
import type { PartitionEntries } from '../../proto/sparse/index.js';
import { ReusedArrays } from './reused-arrays.js';

const HIGH_BINS = 1 << 15;
const LOW_BINS = 1 << 16;
const ABS_MASK = 0x7fffffff;
/** High bin of +∞; NaNs lie above it. */
const INF_BIN = 0x7f80;

/** The exact cut for one k: keep bits > `bits`, and the first `ties` entries with bits == `bits`. */
interface Cut {
  bits: number;
  ties: number;
}

/** Histogram of the high 15 bits of `|x|`. Counts are doubles: a tensor may exceed 2^32 entries. */
function highHistogram(abs: Uint32Array): Float64Array {
  const high = new Float64Array(HIGH_BINS);
  for (let i = 0; i < abs.length; i++) high[(abs[i]! & ABS_MASK) >>> 16]!++;
  return high;
}

function checkFinite(abs: Uint32Array, high: Float64Array, tensor: string): void {
  let nonFinite = 0;
  for (let b = INF_BIN; b < HIGH_BINS; b++) nonFinite += high[b]!;
  if (nonFinite === 0) return;
  const i = abs.findIndex((u) => (u & ABS_MASK) >= INF_BIN << 16);
  throw new FormatError(`delta is not finite at flat position ${i} (NaN or infinity in a checkpoint)`, { tensor });
}

/** Per k: the high bin holding its k-th largest entry (-1 for k = 0) and how many entries lie above that bin. */
function highCuts(high: Float64Array, keep: readonly number[]): { bin: number; above: number }[] {
  return keep.map((k) => {
    if (k === 0) return { bin: -1, above: 0 };
    let above = 0;
    for (let b = HIGH_BINS - 1; b >= 0; b--) {
      const c = high[b]!;
      if (above + c >= k) return { bin: b, above };
      above += c;
    }
    return { bin: 0, above: 0 };
  });
}

/** Flat indices, ascending, of the entries whose high bin is at least `bin`; `count` of them per the histogram. */
function gather(abs: Uint32Array, bin: number, out: Float64Array): Float64Array {
  const lowest = bin << 16;
  let c = 0;
  for (let i = 0; i < abs.length; i++) {
    if ((abs[i]! & ABS_MASK) >= lowest) out[c++] = i;
  }
  return out;
}

/** Each cut's exact bits and ties, from a histogram of the low 16 bits of the candidates in its high bin. */
function lowCuts(
  abs: Uint32Array,
  candidates: Float64Array,
  bins: { bin: number; above: number }[],
  keep: readonly number[],
): Cut[] {
  const slotOf = new Int32Array(HIGH_BINS).fill(-1);
  const slots: number[] = [];
  for (const { bin } of bins) {
    if (bin >= 0 && slotOf[bin] === -1) {
      slotOf[bin] = slots.length;
      slots.push(bin);
    }
  }
  const low = new Float64Array(slots.length * LOW_BINS);
  for (let j = 0; j < candidates.length; j++) {
    const u = abs[candidates[j]!]! & ABS_MASK;
    const slot = slotOf[u >>> 16]!;
    if (slot >= 0) low[slot * LOW_BINS + (u & 0xffff)]!++;
  }
  return bins.map(({ bin, above }, p) => {
    const k = keep[p]!;
    if (bin < 0) return { bits: 0xffffffff, ties: 0 };
    const base = slotOf[bin]! * LOW_BINS;
    let count = above;
    for (let t = LOW_BINS - 1; t >= 0; t--) {
      const c = low[base + t]!;
      if (count + c >= k) return { bits: ((bin << 16) | t) >>> 0, ties: k - count };
      count += c;
    }
    return { bits: 0, ties: k - count };
  });
}

/**
 * Splits the `keep[P-1]` largest-magnitude entries of `delta` into nested
 * partitions: partition p (index p-1) holds the top `keep[p-1]` entries that are
 * not in the top `keep[p-2]`.
 *
 * @param delta the dense delta of one tensor.
 * @param keep kept counts per level, non-decreasing, each at most `delta.length`.
 * @param tensor name used in errors.
 * @param arrays where the result and the candidates live; the result is valid
 *   until these arrays are used again. @default new arrays
 * @throws FormatError when the delta holds NaN or an infinity (the checkpoints themselves hold non-finite weights).
 */
export function selectPartitions(
  delta: Float32Array,
  keep: readonly number[],
  tensor: string,
  arrays = new ReusedArrays(),
): PartitionEntries[] {
  keep.forEach((k, p) => {
    if (!(Number.isInteger(k) && k >= 0 && k <= delta.length) || (p > 0 && k < keep[p - 1]!)) {
      throw new RangeError(
        `keep counts must be non-decreasing integers in [0, ${delta.length}], got ${keep.join(',')}`,
      );
    }
  });
  const abs = new Uint32Array(delta.buffer, delta.byteOffset, delta.length);
  const high = highHistogram(abs);
  checkFinite(abs, high, tensor);
  const P = keep.length;
  const total = P === 0 ? 0 : keep[P - 1]!;
  const positions = arrays.float64('positions', total);
  const values = arrays.float32('values', total);
  // Partition p is the slice between the counts of levels p - 1 and p.
  const parts = keep.map((k, p) => {
    const from = p === 0 ? 0 : keep[p - 1]!;
    return { positions: positions.subarray(from, k), values: values.subarray(from, k) };
  });
  if (total === 0) return parts;

  const bins = highCuts(high, keep);
  const loosestBin = bins[P - 1]!.bin;
  let count = 0;
  for (let b = loosestBin; b < HIGH_BINS; b++) count += high[b]!;
  const candidates = gather(abs, loosestBin, arrays.float64('candidates', count));
  const cuts = lowCuts(abs, candidates, bins, keep);

  const cutBits = new Float64Array(cuts.map((c) => c.bits));
  const cutTies = new Float64Array(cuts.map((c) => c.ties));
  const tiesSeen = new Float64Array(P);
  const cursor = new Int32Array(P);
  const loosest = cutBits[P - 1]!;
  for (let j = 0; j < candidates.length; j++) {
    const i = candidates[j]!;
    const u = abs[i]! & ABS_MASK;
    if (u < loosest) continue;
    let chosen = -1;
    for (let p = 0; p < P; p++) {
      const t = cutBits[p]!;
      if (u > t) {
        if (chosen < 0) chosen = p;
      } else if (u === t) {
        // Counted at every level with this threshold, taken or not, so that the
        // tie order is the index order at every level.
        if (chosen < 0 && tiesSeen[p]! < cutTies[p]!) chosen = p;
        tiesSeen[p]!++;
      }
    }
    if (chosen >= 0) {
      const part = parts[chosen]!;
      const c = cursor[chosen]!++;
      part.positions[c] = i;
      part.values[c] = delta[i]!;
    }
  }
  return parts;
}
