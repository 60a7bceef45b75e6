import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  addTotals,
  magnitudeTotals,
  outliersAbove,
  outlierThreshold,
  significance,
  type SignificanceKind,
} from '../client/prune/significance.js';
import { tensorStats } from '../client/prune/tensor-work.js';
import { uniform } from './fixtures/synthetic-model.js';
import { dpOffsets, keptCount, owlOffsets, rateAt } from '../client/prune/rates.js';
import { checkLevels, defaultLevels } from '../proto/algorithm/index.js';

// The hand-worked example: two model layers, two linear layers each, 10 entries per layer.
//   L0.q: nine 0.1 and one 10   (sum 10.9)     L0.k: ten 1.0  (sum 10)
//   L1.q: nine 0.2 and one 4    (sum 5.8)      L1.k: ten 0.5  (sum 5)
const fill = (v: number, last: number): Float32Array => {
  const a = new Float32Array(10).fill(v);
  a[9] = last;
  return a;
};
const example: { name: string; layer: number; delta: Float32Array }[] = [
  { name: 'layers.0.q.weight', layer: 0, delta: fill(0.1, 10) },
  { name: 'layers.0.k.weight', layer: 0, delta: fill(1, 1) },
  { name: 'layers.1.q.weight', layer: 1, delta: fill(0.2, 4) },
  { name: 'layers.1.k.weight', layer: 1, delta: fill(0.5, 0.5) },
];

/** The DP pipeline on in-memory deltas, composed from the library's pieces as the pruner does. */
function dpRates(kind: SignificanceKind, alpha: number): Map<string, number> {
  const linears = example.map((t) => {
    const totals = magnitudeTotals(t.delta);
    const s = significance(totals, outliersAbove(t.delta, outlierThreshold(totals, 5)), kind);
    return { name: t.name, layer: t.layer, count: t.delta.length, significance: s, totals };
  });
  const layerSig = new Map<number, number>();
  for (const layer of [0, 1]) {
    const members = example.filter((t) => t.layer === layer);
    const totals = addTotals(members.map((t) => magnitudeTotals(t.delta)));
    const threshold = outlierThreshold(totals, 5);
    const out = addTotals(members.map((t) => outliersAbove(t.delta, threshold)));
    layerSig.set(layer, significance(totals, out, kind));
  }
  const offsets = dpOffsets(layerSig, linears, 0.08);
  return new Map([...offsets].map(([name, o]) => [name, rateAt(alpha, o.offset)]));
}

describe('DP rates on the hand-worked example', () => {
  it('magnitude significance', () => {
    // Linear level: s = 10/10.9 = 0.917431, 0, 4/5.8 = 0.689655, 0; w = 0.401772;
    //   e = -0.515659, 0.401772, -0.287884, 0.401772; M = λe/max|e| = -0.08, 0.062331, -0.044663, 0.062331.
    // Layer level: block 0 mean 1.045, threshold 5.225, s0 = 10/20.9 = 0.478469;
    //   block 1 mean 0.54, threshold 2.7, s1 = 4/10.8 = 0.370370; d = -0.054049, +0.054049; L = -0.08, +0.08.
    // Rates at α = 0.5: 0.5 - 0.08 - 0.08 = 0.34; 0.5 - 0.08 + 0.062331 = 0.482331;
    //   0.5 + 0.08 - 0.044663 = 0.535337; 0.5 + 0.08 + 0.062331 = 0.642331.
    const r = dpRates('magnitude', 0.5);
    const expected = [0.34, 0.482331, 0.535337, 0.642331];
    example.forEach((t, i) => assert.ok(Math.abs(r.get(t.name)! - expected[i]!) < 1e-6, `${t.name}: ${r.get(t.name)}`));
  });

  it('count significance', () => {
    // Linear: s = 0.1, 0, 0.1, 0; w = 0.05; e = -0.05, 0.05, -0.05, 0.05; M = ∓0.08.
    // Layer: one outlier in 20 in both blocks: d = 0, so L = 0. Rates: 0.42, 0.58, 0.42, 0.58.
    const r = dpRates('count', 0.5);
    const expected = [0.42, 0.58, 0.42, 0.58];
    example.forEach((t, i) => assert.ok(Math.abs(r.get(t.name)! - expected[i]!) < 1e-9, `${t.name}: ${r.get(t.name)}`));
  });

  it('clamps at 1 when α + offsets exceed it (a layer dropped whole)', () => {
    const r = dpRates('magnitude', 0.95);
    assert.equal(r.get('layers.1.k.weight'), 1);
    assert.equal(keptCount(10, 1), 0);
  });
});

describe('outlier candidates of the significance pass', () => {
  it('give the outliers of a full scan, bit for bit, at every threshold from their bound up', () => {
    const r = uniform(9);
    const delta = Float32Array.from({ length: 20000 }, () => (r() - 0.5) * 0.02 * (r() < 0.01 ? 30 : 1));
    const stats = tensorStats(delta, 5, 5);
    const c = stats.candidates!;
    const mean = stats.totals.sumAbs / stats.totals.count;
    assert.equal(c.bound, (5 * mean) / 2);
    assert.ok(c.magnitudes.length > 0 && c.magnitudes.length < delta.length / 8);
    assert.deepEqual(stats.linearOutliers, outliersAbove(delta, 5 * mean));
    for (const t of [c.bound, c.bound * 1.01, 3 * mean, 5 * mean, 20 * mean, 1]) {
      assert.deepEqual(outliersAbove(c.magnitudes, t), outliersAbove(delta, t), `threshold ${t}`);
    }
    // Below the bound they miss entries: the pruner reads the tensor again there.
    assert.ok(outliersAbove(c.magnitudes, c.bound / 2).count < outliersAbove(delta, c.bound / 2).count);
  });

  it('are not kept when more than an eighth of the entries exceed the bound', () => {
    // 80% zeros and 20% ones: mean 0.2, bound 0.5, a fifth of the entries above it.
    const delta = Float32Array.from({ length: 1000 }, (_, i) => (i % 5 === 0 ? 1 : 0));
    const stats = tensorStats(delta, 5, 5);
    assert.equal(stats.candidates, undefined);
    assert.deepEqual(stats.linearOutliers, { sumAbs: 0, count: 0 });
  });
});

describe('OWL layer offsets', () => {
  it('min-max scales outlier ratios to [0, 2λ] and centres them', () => {
    // D = 0.1, 0.05, 0 → scaled 0.16, 0.08, 0 → mean 0.08 → rate offsets -0.08, 0, +0.08.
    const o = owlOffsets(
      new Map([
        [0, 0.1],
        [1, 0.05],
        [2, 0],
      ]),
      0.08,
    );
    assert.ok(Math.abs(o.get(0)! + 0.08) < 1e-12);
    assert.ok(Math.abs(o.get(1)!) < 1e-12);
    assert.ok(Math.abs(o.get(2)! - 0.08) < 1e-12);
  });
  it('gives 0 when every layer has the same ratio (as both blocks of the example do)', () => {
    const o = owlOffsets(
      new Map([
        [0, 0.05],
        [1, 0.05],
      ]),
      0.08,
    );
    assert.deepEqual([...o.values()], [-0, -0]);
  });
});

describe('levels and counts', () => {
  it('default levels step by 0.1 down to the target', () => {
    assert.deepEqual(defaultLevels(0.9), [0.9]);
    assert.deepEqual(defaultLevels(0.7), [0.9, 0.8, 0.7]);
    assert.deepEqual(defaultLevels(0.75), [0.9, 0.8, 0.75]);
    assert.deepEqual(defaultLevels(0.1), [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]);
  });
  it('kept count is n - floor(rate n), with decimal rates exact', () => {
    assert.equal(keptCount(10, 0.7), 3);
    assert.equal(keptCount(100, 0.9), 10);
    assert.equal(keptCount(7, 0.5), 4);
    assert.equal(keptCount(1000, 0.34), 660);
    assert.equal(keptCount(5, 0), 5);
  });
  it('rejects bad level lists', () => {
    assert.throws(() => checkLevels([0.8, 0.9], 0.9), /decrease/);
    assert.throws(() => checkLevels([0.9, 0.8], 0.7), /target/);
    assert.throws(() => checkLevels([1.2, 0.8], 0.8), /outside/);
    checkLevels([0.95, 0.9], 0.9);
  });
});
