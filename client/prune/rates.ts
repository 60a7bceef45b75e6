/**
 * Pruning rates (spec "DP", steps 2-4, and the OWL baseline): a fixed offset per linear layer from the level, so
 * kept sets nest across partition levels. See docs/design/pruning.md.
 */

/** Scales values so that the largest magnitude becomes `lambda` (spec eq. 4); all zeros stay zero. */
export function normaliseToLambda(values: readonly number[], lambda: number): number[] {
  let max = 0;
  for (const v of values) max = Math.max(max, Math.abs(v));
  return values.map((v) => (max === 0 ? 0 : (lambda * v) / max));
}

/** Significance of one linear layer and the data DP needs about it. */
export interface LinearSignificance {
  name: string;
  /** Model layer (block) index. */
  layer: number;
  /** Number of parameters. */
  count: number;
  /** Linear-level significance `s_lj`. */
  significance: number;
}

/** Per-tensor offsets of DP: `L_l + M_lj`, and both parts for reports. */
export interface DpOffset {
  layerOffset: number;
  linearOffset: number;
  offset: number;
}

/**
 * DP offsets. Layer level: `d_l = mean(s_l) − s_l`, `L_l = λ d_l / max|d|`.
 * Linear level: `w = Σ s_lj n_lj / Σ n_lj`, `e_lj = w − s_lj`, `M_lj = λ e_lj / max|e|`.
 * Higher significance gives a lower rate.
 */
export function dpOffsets(
  layerSignificance: ReadonlyMap<number, number>,
  linears: readonly LinearSignificance[],
  lambda: number,
): Map<string, DpOffset> {
  const layers = [...layerSignificance.keys()].sort((a, b) => a - b);
  const s = layers.map((l) => layerSignificance.get(l)!);
  const meanS = s.reduce((a, b) => a + b, 0) / Math.max(1, s.length);
  const levelL = normaliseToLambda(
    s.map((v) => meanS - v),
    lambda,
  );
  const layerL = new Map(layers.map((l, i) => [l, levelL[i]!]));

  let weighted = 0;
  let total = 0;
  for (const t of linears) {
    weighted += t.significance * t.count;
    total += t.count;
  }
  const w = total === 0 ? 0 : weighted / total;
  const m = normaliseToLambda(
    linears.map((t) => w - t.significance),
    lambda,
  );

  const out = new Map<string, DpOffset>();
  linears.forEach((t, i) => {
    const layerOffset = layerL.get(t.layer) ?? 0;
    const linearOffset = m[i]!;
    out.set(t.name, { layerOffset, linearOffset, offset: layerOffset + linearOffset });
  });
  return out;
}

/**
 * OWL layer offsets: outlier ratios `D_l` min-max scaled to `[0, 2λ]` and centred
 * on their mean; the rate offset is minus that (more outliers, lower rate).
 * Equal ratios give offset 0 everywhere.
 */
export function owlOffsets(outlierRatio: ReadonlyMap<number, number>, lambda: number): Map<number, number> {
  const layers = [...outlierRatio.keys()];
  const d = layers.map((l) => outlierRatio.get(l)!);
  const min = Math.min(...d);
  const max = Math.max(...d);
  const scaled = d.map((v) => (max === min ? 0 : ((v - min) / (max - min)) * 2 * lambda));
  const mean = scaled.reduce((a, b) => a + b, 0) / Math.max(1, scaled.length);
  return new Map(layers.map((l, i) => [l, -(scaled[i]! - mean)]));
}

/** The rate of a tensor with offset `c` at level `a`: `clamp(a + c, 0, 1)`. */
export function rateAt(level: number, offset: number): number {
  return Math.min(1, Math.max(0, level + offset));
}

/**
 * Entries kept at pruning rate `rate`: `n − floor(rate · n)`. A product within
 * 1e-9 (relative) of an integer counts as that integer, so that decimal rates
 * such as 0.7 give the count a person computes by hand (0.7 · 10 = 7, not 6.9999…).
 */
export function keptCount(numel: number, rate: number): number {
  const x = rate * numel;
  const r = Math.round(x);
  const dropped = Math.abs(x - r) <= 1e-9 * Math.max(1, x) ? r : Math.floor(x);
  return numel - dropped;
}
