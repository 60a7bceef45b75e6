/**
 * DARE (drop and rescale), partitioned like DP with one seeded uniform draw per entry so kept sets nest across
 * levels. See docs/design/pruning.md.
 */
import type { PartitionEntries } from '../../proto/sparse/index.js';

/** How kept entries are rescaled. */
export type DareRescale = 'inverse' | 'l1';

/** FNV-1a of a string, to derive one generator seed per tensor. */
function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** A small, fast generator (sfc32) of uniform 32-bit integers. */
export function seededUint32(seed: number, name: string): () => number {
  let a = seed >>> 0;
  let b = hashName(name);
  let c = 0x9e3779b9;
  let d = 1;
  const next = (): number => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return t >>> 0;
  };
  for (let i = 0; i < 12; i++) next();
  return next;
}

/**
 * DARE partitions of one tensor's delta.
 *
 * @param levels decreasing drop probabilities ending at the target rate `p`.
 * @param rescale `inverse` scales kept entries by `1/(1−p)` (the paper's DARE);
 *   `l1` scales them so that their L1 norm equals the dense delta's (mergekit).
 */
export function darePartitions(
  delta: Float32Array,
  levels: readonly number[],
  opts: { seed: number; tensor: string; rescale: DareRescale },
): PartitionEntries[] {
  const P = levels.length;
  // u ≥ a  ⇔  u32 ≥ ceil(a · 2^32): integer comparisons, exact for any level.
  const cut = levels.map((a) => Math.ceil(a * 2 ** 32));
  const partOf = new Uint8Array(delta.length);
  const sizes = new Float64Array(P);
  const next = seededUint32(opts.seed, opts.tensor);
  const loosest = cut[P - 1]!;
  let sumAll = 0;
  let sumKept = 0;
  for (let i = 0; i < delta.length; i++) {
    const u = next();
    const a = Math.abs(delta[i]!);
    sumAll += a;
    if (u < loosest) continue;
    let p = 0;
    while (u < cut[p]!) p++;
    partOf[i] = p + 1;
    sizes[p]!++;
    sumKept += a;
  }
  const target = levels[P - 1]!;
  const scale = opts.rescale === 'l1' ? (sumKept === 0 ? 1 : sumAll / sumKept) : 1 / (1 - target);
  const parts = [...sizes].map((n) => ({ positions: new Float64Array(n), values: new Float32Array(n) }));
  const cursor = new Int32Array(P);
  for (let i = 0; i < delta.length; i++) {
    const p = partOf[i]!;
    if (p === 0) continue;
    const part = parts[p - 1]!;
    const c = cursor[p - 1]!++;
    part.positions[c] = i;
    part.values[c] = delta[i]! * scale;
  }
  return parts;
}
