/**
 * The DPA amplification rule: which factor scales each partition of a
 * party's delta, the same in the server's merge and in `dppa apply`.
 */

/**
 * The factor of partition `p` for a party: `factors[p − 1]` for partitions
 * 1..P, and for partition 0 (outside tensors) 1, or the largest factor when
 * `outsideByMax` (the released code's behaviour).
 * @throws RangeError if `p` has no factor.
 */
export function partitionFactor(factors: readonly number[], p: number, outsideByMax: boolean): number {
  if (p === 0) return outsideByMax && factors.length > 0 ? Math.max(...factors) : 1;
  const f = factors[p - 1];
  if (f === undefined) throw new RangeError(`no amplification factor for partition ${p} (${factors.length} given)`);
  return f;
}
