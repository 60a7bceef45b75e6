/**
 * Significance of a set of delta parameters (spec "DP", step 1): the share of
 * outliers, `|x| > N · mean(|x|)`, by magnitude mass (the paper) or by count
 * (the released code and OWL).
 */

/** How the outliers' share is measured. */
export type SignificanceKind = 'magnitude' | 'count';

/** Sum of magnitudes and number of entries of a parameter set; sums add across sets. */
export interface MagnitudeTotals {
  sumAbs: number;
  count: number;
}

/** Magnitude mass and number of entries above a threshold. */
export interface OutlierTotals {
  sumAbs: number;
  count: number;
}

/** Totals of one tensor's delta. Accumulated in float64 so that 10^8 entries add without drift. */
export function magnitudeTotals(delta: Float32Array): MagnitudeTotals {
  let sum = 0;
  for (let i = 0; i < delta.length; i++) sum += Math.abs(delta[i]!);
  return { sumAbs: sum, count: delta.length };
}

/** Entries of `delta` with `|x| > threshold` (strictly), their mass and count. */
export function outliersAbove(delta: Float32Array, threshold: number): OutlierTotals {
  let sum = 0;
  let count = 0;
  for (let i = 0; i < delta.length; i++) {
    const a = Math.abs(delta[i]!);
    if (a > threshold) {
      sum += a;
      count++;
    }
  }
  return { sumAbs: sum, count };
}

/**
 * The magnitudes of a delta above `bound`, in index order. For any threshold
 * `t ≥ bound`, `outliersAbove(magnitudes, t)` equals `outliersAbove(delta, t)`
 * bit for bit (same entries, added in the same order), so a block's outliers
 * can be counted once its mean is known without reading the delta again.
 */
export interface OutlierCandidates {
  bound: number;
  magnitudes: Float32Array;
}

/**
 * {@link outliersAbove} at `threshold`, and in the same pass the candidates
 * above `bound`; none when more than `cap` entries exceed `bound`.
 */
export function outliersAndCandidates(
  delta: Float32Array,
  threshold: number,
  bound: number,
  cap: number,
): { outliers: OutlierTotals; candidates: OutlierCandidates | undefined } {
  let sum = 0;
  let count = 0;
  // Fresh memory is touched only as far as it is filled.
  const kept = new Float32Array(Math.min(cap, delta.length));
  let c = 0;
  for (let i = 0; i < delta.length; i++) {
    const a = Math.abs(delta[i]!);
    if (a > threshold) {
      sum += a;
      count++;
    }
    if (a > bound) {
      if (c < kept.length) kept[c] = a;
      c++;
    }
  }
  const candidates = c <= kept.length ? { bound, magnitudes: kept.slice(0, c) } : undefined;
  return { outliers: { sumAbs: sum, count }, candidates };
}

/** Adds totals of several sets (e.g. the linear layers of one block). */
export function addTotals<T extends MagnitudeTotals>(parts: readonly T[]): MagnitudeTotals {
  let sumAbs = 0;
  let count = 0;
  for (const p of parts) {
    sumAbs += p.sumAbs;
    count += p.count;
  }
  return { sumAbs, count };
}

/** The outlier threshold `N · mean(|x|)` of a set; 0 for an empty set. */
export function outlierThreshold(totals: MagnitudeTotals, factor: number): number {
  return totals.count === 0 ? 0 : (factor * totals.sumAbs) / totals.count;
}

/**
 * The significance of a set: outliers' share of the magnitude mass or of the count.
 * An all-zero or empty set has significance 0.
 */
export function significance(totals: MagnitudeTotals, outliers: OutlierTotals, kind: SignificanceKind): number {
  if (kind === 'count') return totals.count === 0 ? 0 : outliers.count / totals.count;
  return totals.sumAbs === 0 ? 0 : outliers.sumAbs / totals.sumAbs;
}
