/**
 * Exact, linear-time top-k selection by magnitude for several nested k at once
 * (spec "DP", step 4, and "Partitions").
 *
 * The magnitude order of non-negative float32 values equals the order of their
 * bit patterns read as unsigned integers, so a two-digit radix select (high 15
 * bits, then low 16 bits) finds the exact threshold of each k in three passes,
 * with no sort. Ties at a threshold go to the lower flat index, so the result
 * depends on the data alone.
 */
import { FormatError } from '../../proto/errors.js';
import type { PartitionEntries } from '../../proto/sparse/index.js';


const HIGH_BINS = 1 << 15;
const LOW_BINS = 1 << 16;
const ABS_MASK = 0x7fffffff;
const INF_BITS = 0x7f800000;

/** The exact cut for one k: keep bits > `bits`, and the first `ties` entries with bits == `bits`. */
interface Cut {
  bits: number;
  ties: number;
}

function findCuts(abs: Uint32Array, keep: readonly number[]): Cut[] {
  const high = new Float64Array(HIGH_BINS);
  for (let i = 0; i < abs.length; i++) high[(abs[i]! & ABS_MASK) >>> 16]!++;

  // Per k: the high bin holding its k-th largest entry and how many lie above that bin.
  const bins = keep.map((k) => {
    if (k === 0) return { bin: -1, above: 0 };
    let above = 0;
    for (let b = HIGH_BINS - 1; b >= 0; b--) {
      const c = high[b]!;
      if (above + c >= k) return { bin: b, above };
      above += c;
    }
    return { bin: 0, above: 0 };
  });

  const slotOf = new Int32Array(HIGH_BINS).fill(-1);
  const slots: number[] = [];
  for (const { bin } of bins) {
    if (bin >= 0 && slotOf[bin] === -1) {
      slotOf[bin] = slots.length;
      slots.push(bin);
    }
  }
  const low = new Float64Array(slots.length * LOW_BINS);
  if (slots.length > 0) {
    for (let i = 0; i < abs.length; i++) {
      const u = abs[i]! & ABS_MASK;
      const slot = slotOf[u >>> 16]!;
      if (slot >= 0) low[slot * LOW_BINS + (u & 0xffff)]!++;
    }
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
 * @throws FormatError when the delta holds NaN or an infinity (the checkpoints themselves hold non-finite weights).
 */
export function selectPartitions(delta: Float32Array, keep: readonly number[], tensor: string): PartitionEntries[] {
  keep.forEach((k, p) => {
    if (!(Number.isInteger(k) && k >= 0 && k <= delta.length) || (p > 0 && k < keep[p - 1]!)) {
      throw new RangeError(`keep counts must be non-decreasing integers in [0, ${delta.length}], got ${keep.join(',')}`);
    }
  });
  const abs = new Uint32Array(delta.buffer, delta.byteOffset, delta.length);
  for (let i = 0; i < abs.length; i++) {
    if ((abs[i]! & ABS_MASK) >= INF_BITS) {
      throw new FormatError(`delta is not finite at flat position ${i} (NaN or infinity in a checkpoint)`, { tensor });
    }
  }
  const cuts = findCuts(abs, keep);
  const parts = keep.map((k, p) => {
    const size = k - (p === 0 ? 0 : keep[p - 1]!);
    return { positions: new Float64Array(size), values: new Float32Array(size) };
  });
  if (keep.length === 0) return parts;

  const P = cuts.length;
  const cutBits = new Float64Array(cuts.map((c) => c.bits));
  const cutTies = new Float64Array(cuts.map((c) => c.ties));
  const tiesSeen = new Float64Array(P);
  const cursor = new Int32Array(P);
  const loosest = cutBits[P - 1]!;
  for (let i = 0; i < abs.length; i++) {
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
