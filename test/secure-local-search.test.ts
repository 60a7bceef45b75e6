/**
 * DPA at the party (secure jobs): the local factor search on real safetensors checkpoints with a real evaluation
 * (the candidate's distance to a target built with known factors), through the SDK callback and through an
 * `--eval-cmd` process; resuming from the record; and the scaled values a party masks, checked against `applyDelta`.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { applyDelta, pruneToFile, type EvaluationCandidate } from '../client/index.js';
import { commandEvaluator, shellQuote } from '../client/cli/eval-command.js';
import { searchLocally } from '../client/secure/local-search.js';
import { scaledTensors } from '../client/secure/scaled-delta.js';
import { Checkpoint, decodeToF32, encodeFromF32 } from '../proto/safetensors/index.js';
import { nearScore } from './fixtures/near-score.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
let finetuned: string;
let delta: string;
let target: string;
/** The factors the target was built with: the search's optimum (greedy, upward from 1 in steps of 0.1). */
const OPTIMUM = [1.3, 1.2];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-local-search-'));
  ({
    base,
    finetuned: [finetuned],
  } = (await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 7 })) as { base: string; finetuned: [string] });
  delta = join(dir, 'delta.dppa');
  // Rate 0.8: levels 0.9 and 0.8, two partitions.
  await pruneToFile({ base, finetuned, rate: 0.8, out: delta, valueKind: 'delta' });
  target = join(dir, 'target');
  await applyDelta({ base, delta, out: target, factors: OPTIMUM });
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** The candidates Method 1's greedy search (`progressive`) visits from [1, 0] towards the optimum [1.3, 1.2]. */
const VISITS = [
  [1, 0],
  [1.1, 0],
  [1.2, 0],
  [1.3, 0],
  [1.4, 0],
  [1.3, 1],
  [1.3, 1.1],
  [1.3, 1.2],
  [1.3, 1.3],
];

describe('local factor search', () => {
  it('finds the factors the target was built with, scoring materialised candidates with the SDK callback', async () => {
    const seen: EvaluationCandidate[] = [];
    const result = await searchLocally({
      base,
      finetuned,
      delta,
      workDir: join(dir, 'work-sdk'),
      search: { method: 'progressive' },
      evaluate: async (modelDir, c) => {
        seen.push(c);
        return nearScore(modelDir, target);
      },
    });
    assert.deepEqual(result.factors, OPTIMUM);
    assert.deepEqual(
      seen.map((c) => c.kind),
      ['dense', ...VISITS.map(() => 'amplified')],
    );
    assert.deepEqual(
      seen.slice(1).map((c) => c.factors),
      VISITS,
    );
    assert.equal(result.evaluations, VISITS.length);
    assert.equal(result.scoredNow, VISITS.length);
    const dense = await nearScore(finetuned, target);
    assert.deepEqual(result.dense, dense);
    assert.ok(dense.near! < 1, 'the dense fine-tuned model is not the target');
    // near = 1 at the target, steady constant: the geometric mean of near / dense near and 1.
    assert.ok(Math.abs(result.domainRatio - Math.sqrt(1 / dense.near!)) < 1e-12, String(result.domainRatio));
  });

  it('resumes from its record after an evaluation failed, scoring no candidate twice', async () => {
    const workDir = join(dir, 'work-resume');
    let calls = 0;
    await assert.rejects(
      searchLocally({
        base,
        finetuned,
        delta,
        workDir,
        search: { method: 'progressive' },
        retries: 0,
        evaluate: async (modelDir) => {
          if (++calls === 4) throw new Error('the GPU fell off');
          return nearScore(modelDir, target);
        },
      }),
      { name: 'EvaluationError', message: /factors \[1\.2, 0\].*the GPU fell off/ },
    );
    const again: number[][] = [];
    const result = await searchLocally({
      base,
      finetuned,
      delta,
      workDir,
      search: { method: 'progressive' },
      evaluate: async (modelDir, c) => {
        again.push(c.factors);
        return nearScore(modelDir, target);
      },
    });
    assert.deepEqual(result.factors, OPTIMUM);
    // Recorded before the failure: the dense reference, [1, 0] and [1.1, 0].
    assert.deepEqual(again, VISITS.slice(2));
    assert.equal(result.scoredNow, VISITS.length - 2);
    assert.equal(result.evaluations, VISITS.length);
  });

  it('scores with an --eval-cmd process (golden-section tuner)', async () => {
    const script = join(import.meta.dirname, 'fixtures', 'near-eval-cmd.ts');
    const evaluate = commandEvaluator(
      `NEAR_TARGET=${shellQuote(target)} ${shellQuote(process.execPath)} --import tsx ${shellQuote(script)} {model}`,
    );
    const result = await searchLocally({
      base,
      finetuned,
      delta,
      workDir: join(dir, 'work-cmd'),
      search: { method: 'progressive', tuner: 'golden', budget: 4, upper: 2 },
      evaluate,
    });
    // Golden section on [1, 2] with 4 evaluations per factor visits 1, 1 + φ², 1 + φ and then 1 + φ − φ² (1.236),
    // φ = 0.618…: of these, 1.236 is the nearest to both 1.3 (f1) and 1.2 (f2).
    const phi = (Math.sqrt(5) - 1) / 2;
    const g = 1 + phi - phi * phi;
    assert.equal(result.factors.length, 2);
    for (const f of result.factors) assert.ok(Math.abs(f - g) < 1e-6, `factors ${result.factors.join(', ')}`);
    assert.equal(result.evaluations, 8);
    const dense = await nearScore(finetuned, target);
    assert.ok(result.domainRatio > 1 && result.domainRatio < Math.sqrt(1 / dense.near!));
  });
});

describe('scaled delta', () => {
  it('base + the scaled values is what applyDelta writes with the same factors and weight', async () => {
    const factors = [1.7, 0.6];
    const weight = 0.75;
    const applied = join(dir, 'applied');
    await applyDelta({ base, delta, out: applied, factors, scale: weight, outsideByMax: true });
    const [b, a] = await Promise.all([Checkpoint.open(base), Checkpoint.open(applied)]);
    try {
      let tensors = 0;
      let entries = 0;
      for await (const t of scaledTensors(delta, { factors, weight, outsideByMax: true })) {
        tensors++;
        entries += t.positions.length;
        for (let i = 1; i < t.positions.length; i++) assert.ok(t.positions[i]! > t.positions[i - 1]!);
        const acc = await b.readF32(t.name);
        for (let i = 0; i < t.positions.length; i++) {
          const p = t.positions[i]!;
          acc[p] = acc[p]! + t.values[i]!;
        }
        const dtype = b.info(t.name).dtype;
        const mine = decodeToF32(encodeFromF32(acc, dtype), dtype);
        assert.deepEqual(mine, await a.readF32(t.name), t.name);
      }
      assert.equal(tensors, b.tensors().length);
      assert.ok(entries > 0);
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });
});
