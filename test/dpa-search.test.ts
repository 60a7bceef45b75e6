import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  domainRatio,
  factorKey,
  memoised,
  searchDefaults,
  searchFactors,
  searchOptions,
  type FactorSearchOptions,
} from '../proto/algorithm/index.js';
import { SearchConfig, SearchMethod } from '../proto/gen/dppa/v1/jobs.js';

/** A separable, unimodal score with its maximum at `opt`; records every candidate asked for. */
function synthetic(opt: number[]): { score: (f: number[]) => Promise<number>; asked: number[][] } {
  const asked: number[][] = [];
  return {
    asked,
    score: (f) => {
      asked.push(f.slice());
      return Promise.resolve(-f.reduce((a, x, i) => a + (x - opt[i]!) ** 2, 0));
    },
  };
}

describe('factor search', () => {
  it('Method 1 (progressive) follows the released code’s climb and lands on the optimum', async () => {
    const s = synthetic([1.3, 1.1]);
    const r = await searchFactors({ partitions: 2, method: 'progressive' }, s.score);
    assert.deepEqual(s.asked, [
      [1, 0],
      [1.1, 0],
      [1.2, 0],
      [1.3, 0],
      [1.4, 0],
      [1.3, 1],
      [1.3, 1.1],
      [1.3, 1.2],
    ]);
    assert.deepEqual(r.factors, [1.3, 1.1]);
    assert.equal(r.evaluations, 8);
  });

  it('Method 2 (whole) starts with every partition and scores no candidate twice', async () => {
    const s = synthetic([1.3, 1.1, 0.9]);
    const r = await searchFactors({ partitions: 3, method: 'whole', start: 1.8 }, s.score);
    assert.deepEqual(s.asked, [
      [1.8, 1, 1],
      [1.9, 1, 1],
      [1.8, 1.1, 1],
      [1.8, 1.2, 1],
      [1.8, 1.1, 1.1],
    ]);
    // Climbing upward from 1.8 cannot reach 1.3: the greedy climb stops at its start, as the released code does.
    assert.deepEqual(r.factors, [1.8, 1.1, 1]);
    assert.equal(new Set(s.asked.map(factorKey)).size, s.asked.length);
  });

  it('Method 2 is the default: of searchFactors, and of a job whose SearchConfig leaves the method unset', async () => {
    assert.equal(searchDefaults({ partitions: 2 }).method, 'whole');
    const method = (m: SearchMethod): FactorSearchOptions['method'] =>
      searchOptions({ ...SearchConfig.fromPartial({}), method: m }, 2).method;
    assert.equal(method(SearchMethod.SEARCH_METHOD_UNSPECIFIED), 'whole');
    assert.equal(method(SearchMethod.SEARCH_METHOD_WHOLE), 'whole');
    assert.equal(method(SearchMethod.SEARCH_METHOD_PROGRESSIVE), 'progressive');
    // The unset method searches as Method 2 does: [1, 1] first, not Method 1's [1, 0].
    const s = synthetic([1.3, 1.1]);
    await searchFactors({ partitions: 2 }, s.score);
    assert.deepEqual(s.asked[0], [1, 1]);
  });

  it('lands within one step of an optimum between grid points', async () => {
    const opt = [2.34, 1.57];
    const s = synthetic(opt);
    const r = await searchFactors({ partitions: 2 }, s.score);
    r.factors.forEach((f, i) => assert.ok(Math.abs(f - opt[i]!) <= 0.1 + 1e-9, `factor ${i + 1}: ${f} vs ${opt[i]}`));
  });

  it('searches downward for DARE + DPA', async () => {
    const s = synthetic([0.7]);
    const r = await searchFactors({ partitions: 1, downward: true }, s.score);
    assert.deepEqual(s.asked, [[1], [0.9], [0.8], [0.7], [0.6]]);
    assert.deepEqual(r.factors, [0.7]);
  });

  it('golden-section stays within its budget and tolerance', async () => {
    const opt = [3.7, 1.9];
    const s = synthetic(opt);
    const budget = 12;
    const o: FactorSearchOptions = { partitions: 2, tuner: 'golden', budget, upper: 10 };
    const r = await searchFactors(o, s.score);
    assert.ok(r.evaluations <= 2 * budget, `${r.evaluations} evaluations`);
    // After budget − 3 golden steps the bracket [1, 10] has shrunk by φ^(budget−3).
    const tol = 9 * ((Math.sqrt(5) - 1) / 2) ** (budget - 3);
    r.factors.forEach((f, i) =>
      assert.ok(Math.abs(f - opt[i]!) <= tol, `factor ${i + 1}: ${f} vs ${opt[i]} (tolerance ${tol})`),
    );
  });

  it('resumes an interrupted search from its record without repeating an evaluation', async () => {
    const opt = [1.4, 1.2];
    const full = synthetic(opt);
    const expected = await searchFactors({ partitions: 2 }, full.score);

    const record = new Map<string, number>();
    const first = synthetic(opt);
    let calls = 0;
    const crashing = async (f: number[]): Promise<number> => {
      if (++calls > 4) throw new Error('server killed');
      return first.score(f);
    };
    await assert.rejects(
      searchFactors(
        { partitions: 2 },
        memoised(record, crashing, (f, s) => void record.set(factorKey(f), s)),
      ),
      /server killed/,
    );
    assert.equal(record.size, 4);

    const second = synthetic(opt);
    const resumed = await searchFactors(
      { partitions: 2 },
      memoised(record, second.score, () => undefined),
    );
    assert.deepEqual(resumed.factors, expected.factors);
    assert.deepEqual([...first.asked, ...second.asked], full.asked, 'the same candidates, each scored once');
  });

  it('rejects bad settings by name', async () => {
    const s = synthetic([1]);
    await assert.rejects(searchFactors({ partitions: 0 }, s.score), /partitions/);
    await assert.rejects(searchFactors({ partitions: 1, start: 11 }, s.score), /start/);
    await assert.rejects(searchFactors({ partitions: 1, tuner: 'golden', budget: 2 }, s.score), /budget/);
  });
});

describe('Domain-Ratio', () => {
  it('is the geometric mean of task ratios', () => {
    // ratios 0.5 and 0.8 → sqrt(0.4) = 0.632456
    assert.ok(Math.abs(domainRatio({ a: 0.25, b: 0.4 }, { a: 0.5, b: 0.5 }) - Math.sqrt(0.4)) < 1e-12);
    assert.equal(domainRatio({ a: 0, b: 0.4 }, { a: 0.5, b: 0.5 }), 0);
    assert.throws(() => domainRatio({ c: 1 }, { a: 1 }), /no score for the dense/);
  });
});
