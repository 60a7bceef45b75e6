/**
 * What `npm run demo` and `npm run repro` compute with (docs/examples/family-lab.ts): the Domain-Ratio arithmetic
 * and its table, the in-memory merge against the client's `applyDelta`, and the scorer against the accuracies
 * recorded in the family's family.json.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { applyDelta, pruneToFile } from '../client/index.js';
import {
  DOMAINS,
  DOMAIN_NAMES,
  FAMILY,
  FamilyScorer,
  denseDelta,
  domainRatioPercent,
  fmt,
  markdownTable,
  memberDir,
  mergeWeights,
  readSparseDelta,
  readWeights,
  type Weights,
} from '../docs/examples/family-lab.js';

let dir: string;
let base: Map<string, Float32Array>;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-family-lab-'));
  base = await readWeights(memberDir('base'));
});
after(() => rm(dir, { recursive: true, force: true }));

function assertSameWeights(a: Weights, b: Weights): void {
  assert.deepEqual([...a.keys()], [...b.keys()]);
  for (const [name, x] of a) assert.deepEqual(x, b.get(name), name);
}

describe('Domain-Ratio', () => {
  it('is the geometric mean of the Task-Ratios, in percent', () => {
    // Task-Ratios 0.5 and 0.9 / 0.9 = 1: √(0.5 · 1) = 70.71 %.
    assert.equal(domainRatioPercent({ add: 0.5, max: 0.9 }, { add: 1, max: 0.9 }).toFixed(2), '70.71');
    assert.equal(domainRatioPercent({ a: 0.2, b: 0.8 }, { a: 0.4, b: 0.4 }), 100);
    assert.equal(domainRatioPercent({ a: 0, b: 0.8 }, { a: 0.4, b: 0.4 }), 0, 'one task at 0 makes it 0');
    assert.equal(
      domainRatioPercent({ a: 0.1, b: 0.3 }, { a: 0, b: 0.6 }),
      50,
      'a task the fine-tune cannot do is left out',
    );
  });

  it('prints a table with padded columns, numbers as the paper prints them', () => {
    const rows = [
      ['math', 86.849, 0],
      ['finance', 92.111, 7.5],
      ['law', 110.55, Number.NaN],
    ] as const;
    assert.equal(
      markdownTable(
        ['domain', 'DPPA', 'dense sum'],
        rows.map(([d, a, b]) => [d, fmt(a), fmt(b)]),
      ),
      [
        '| domain  |   DPPA | dense sum |',
        '| ------- | -----: | --------: |',
        '| math    |  86.85 |      0.00 |',
        '| finance |  92.11 |      7.50 |',
        '| law     | 110.55 |         — |',
      ].join('\n'),
    );
    assert.equal(fmt(undefined), '—');
    assert.equal(markdownTable(['a'], []), '| a |\n| - |');
  });
});

describe('merges in memory', () => {
  it('base + the dense delta is the fine-tune, but for the rare entry the fp32 delta rounds off', async () => {
    const math = await readWeights(memberDir('math'));
    const merged = mergeWeights(base, [{ delta: denseDelta(base, math) }]);
    let differ = 0;
    for (const [name, want] of math) {
      const got = merged.get(name)!;
      const b = base.get(name)!;
      for (let i = 0; i < want.length; i++) {
        if (got[i] === want[i]) continue;
        differ++;
        // F − B in fp32 can lose low bits (spec: the delta is computed in fp32): two fp32 roundings, each within half
        // an fp32 step of |F| + |B|. Relative to F alone the error is unbounded when F is tiny next to B.
        assert.ok(
          Math.abs(got[i]! - want[i]!) <= (Math.abs(want[i]!) + Math.abs(b[i]!)) * 2 ** -23,
          `${name}[${i}]: ${got[i]} against ${want[i]} (base ${b[i]})`,
        );
      }
    }
    assert.ok(differ <= 2, `${differ} entries differ`);
  });

  it("equal what the client's applyDelta writes, with amplification factors", async () => {
    const file = join(dir, 'law-dp.dppa');
    await pruneToFile({
      base: memberDir('base'),
      finetuned: memberDir('law'),
      rate: 0.7,
      method: 'dp',
      out: file,
      workers: 1,
    });
    const factors = [1.7, 1.2, 0.9];
    await applyDelta({ base: memberDir('base'), delta: file, factors, out: join(dir, 'applied') });
    const delta = await readSparseDelta(file, base);
    assert.deepEqual(delta.levels, [0.9, 0.8, 0.7]);
    assertSameWeights(mergeWeights(base, [{ delta, factors }]), await readWeights(join(dir, 'applied')));
  });
});

describe('FamilyScorer', () => {
  it('scores each fine-tune on its test split as family.json records (answerMatch)', async () => {
    const family = JSON.parse(await readFile(join(FAMILY, 'family.json'), 'utf8')) as {
      accuracy: Record<string, Record<string, { test: { answerMatch: number; total: number } }>>;
    };
    const scorer = await FamilyScorer.open('test');
    try {
      for (const d of DOMAIN_NAMES) {
        const scores = await scorer.score(await readWeights(memberDir(d)), d);
        assert.deepEqual(Object.keys(scores), [...DOMAINS[d]]);
        for (const [task, s] of Object.entries(scores)) {
          const want = family.accuracy[d]![`${d}/${task}`]!.test;
          assert.equal(s, want.answerMatch / want.total, `${d}/${task}`);
        }
      }
      assert.equal(scorer.evaluations, 3);
    } finally {
      await scorer.close();
    }
  });

  it('refuses to score a domain open() did not load, naming it', async () => {
    const scorer = await FamilyScorer.open('validation', { domains: ['math'] });
    try {
      const weights = await readWeights(memberDir('finance'));
      await assert.rejects(
        scorer.score(weights, 'finance'),
        /^Error: domain finance not loaded \(open\(\{ domains \}\) loaded math\)$/,
      );
      assert.equal(scorer.evaluations, 0);
    } finally {
      await scorer.close();
    }
  });
});
