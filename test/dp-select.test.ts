import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { uniform } from './fixtures/synthetic-model.js';
import { selectPartitions } from '../client/prune/select.js';
import { darePartitions } from '../client/prune/dare.js';
import { keptCount } from '../client/prune/rates.js';

/** Reference: full sort by |x| descending, ties by lower index. */
function referenceTopK(delta: Float32Array, k: number): number[] {
  const idx = [...delta.keys()];
  idx.sort((a, b) => Math.abs(delta[b]!) - Math.abs(delta[a]!) || a - b);
  return idx.slice(0, k).sort((a, b) => a - b);
}

function randomDelta(n: number, seed: number, ties = false): Float32Array {
  const r = uniform(seed);
  const d = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    // With ties: few distinct magnitudes and some zeros, so the cut falls inside a run of equals.
    d[i] = ties ? (Math.floor(r() * 5) - 2) * 0.5 : (r() - 0.5) * 0.02 * (r() < 0.01 ? 50 : 1);
  }
  return d;
}

describe('selectPartitions', () => {
  for (const [n, ties] of [
    [1000, false],
    [1000, true],
    [65537, false],
    [20000, true],
  ] as const) {
    it(`matches a sort-based reference (n=${n}, ties=${ties})`, () => {
      const delta = randomDelta(n, n + (ties ? 1 : 0), ties);
      const rates = [0.9, 0.8, 0.55, 0.3];
      const keep = rates.map((r) => keptCount(n, r));
      const parts = selectPartitions(delta, keep, 't');
      let union: number[] = [];
      parts.forEach((part, p) => {
        assert.equal(part.positions.length, keep[p]! - (p === 0 ? 0 : keep[p - 1]!), 'exact count per partition');
        union = union.concat([...part.positions]);
        for (let i = 0; i < part.positions.length; i++) {
          assert.equal(part.values[i], delta[part.positions[i]!]);
          if (i > 0) assert.ok(part.positions[i]! > part.positions[i - 1]!, 'ascending positions');
        }
        // The kept set at level p is exactly the reference top-k: so sets are nested.
        assert.deepEqual(
          union.slice().sort((a, b) => a - b),
          referenceTopK(delta, keep[p]!),
        );
      });
    });
  }

  it('keeps everything at rate 0 and nothing at rate 1', () => {
    const delta = randomDelta(100, 5);
    const [none, rest] = selectPartitions(delta, [0, 100], 't');
    assert.equal(none!.positions.length, 0);
    assert.equal(rest!.positions.length, 100);
  });

  it('never keeps a zero ahead of a non-zero entry', () => {
    const delta = new Float32Array([0, 0, -0, 1e-30, 0, 2]);
    const [p] = selectPartitions(delta, [2], 't');
    assert.deepEqual([...p!.positions], [3, 5]);
  });

  it('rejects non-finite deltas naming the tensor', () => {
    assert.throws(
      () => selectPartitions(new Float32Array([1, NaN]), [1], 'layers.0.q.weight'),
      /layers\.0\.q\.weight.*flat position 1/,
    );
  });
});

describe('darePartitions', () => {
  it('is reproducible for a seed and differs across seeds', () => {
    const delta = randomDelta(5000, 9);
    const a = darePartitions(delta, [0.9, 0.8], { seed: 1, tensor: 'x', rescale: 'inverse' });
    const b = darePartitions(delta, [0.9, 0.8], { seed: 1, tensor: 'x', rescale: 'inverse' });
    const c = darePartitions(delta, [0.9, 0.8], { seed: 2, tensor: 'x', rescale: 'inverse' });
    assert.deepEqual(a, b);
    assert.notDeepEqual(a[0]!.positions, c[0]!.positions);
  });

  it('is unbiased: the rescaled sum estimates the delta sum', () => {
    // Each entry contributes x_i·B_i/(1-p), B_i ~ Bernoulli(1-p): mean x_i, variance x_i²·p/(1-p).
    // So the sum of kept values has standard deviation sqrt(Σx² · p/(1-p)); we accept 4 of them
    // (a false alarm about once in 16000 seeds).
    const n = 200000;
    const delta = randomDelta(n, 11);
    const p = 0.9;
    const parts = darePartitions(delta, [p], { seed: 7, tensor: 'layers.3.mlp', rescale: 'inverse' });
    let kept = 0;
    for (const v of parts[0]!.values) kept += v;
    let sum = 0;
    let sq = 0;
    for (const x of delta) {
      sum += x;
      sq += x * x;
    }
    const sd = Math.sqrt((sq * p) / (1 - p));
    assert.ok(Math.abs(kept - sum) < 4 * sd, `rescaled sum ${kept} vs ${sum}, sd ${sd}`);
    // And the kept fraction is near 1 - p (binomial, 4 standard deviations).
    const frac = parts[0]!.positions.length / n;
    assert.ok(Math.abs(frac - (1 - p)) < 4 * Math.sqrt((p * (1 - p)) / n), `kept fraction ${frac}`);
  });

  it('nests partitions and tags each entry with the first level keeping it', () => {
    const delta = randomDelta(10000, 3);
    const parts = darePartitions(delta, [0.9, 0.8, 0.5], { seed: 3, tensor: 't', rescale: 'inverse' });
    const seen = new Set<number>();
    for (const part of parts)
      for (const pos of part.positions) {
        assert.ok(!seen.has(pos));
        seen.add(pos);
      }
    // Partition sizes near 10%, 10%, 30% of n.
    const sizes = parts.map((p) => p.positions.length / 10000);
    [0.1, 0.1, 0.3].forEach((e, i) => assert.ok(Math.abs(sizes[i]! - e) < 0.03, `partition ${i + 1}: ${sizes[i]}`));
    // Values rescaled by 1/(1 - 0.5) = 2.
    assert.equal(parts[2]!.values[0], Math.fround(delta[parts[2]!.positions[0]!]! * 2));
  });

  it('l1 rescale matches the dense L1 norm', () => {
    const delta = randomDelta(10000, 4);
    const [part] = darePartitions(delta, [0.7], { seed: 1, tensor: 't', rescale: 'l1' });
    let keptL1 = 0;
    for (const v of part!.values) keptL1 += Math.abs(v);
    let l1 = 0;
    for (const v of delta) l1 += Math.abs(v);
    assert.ok(Math.abs(keptL1 - l1) / l1 < 1e-5);
  });
});
