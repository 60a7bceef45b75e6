/**
 * The committed model family (test/fixtures/family): its files, its ONNX
 * graph against the TensorFlow.js model of the same architecture, its recorded
 * accuracies against ONNX Runtime and the PyTorch trainer, and the four goals
 * of issue #13 measured afresh on the committed checkpoints.
 * Regeneration is `npm run family:generate` (PyTorch); `npm run family:check` compares.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import { Checkpoint } from '../proto/safetensors/index.js';
import {
  FAMILY_DIR,
  MODELS,
  allSplits,
  deltaStats,
  linearNames,
  llamaConfigJson,
  measureMerges,
  type MergeRatios,
  taskKey,
  type FamilyJson,
} from './fixtures/family/generate.js';
import { forward, tensorSpecs } from './fixtures/family/model.js';
import { buildOnnx } from './fixtures/family/onnx-graph.js';
import { OnnxLm, readWeights } from './fixtures/family/onnx-eval.js';
import { SETTINGS } from './fixtures/family/settings.js';
import { BOS, DOMAINS, TASKS, encode, rng, tokenizerJson, type Example } from './fixtures/family/tasks.js';
import { greedyTf, toTensors, useBackend } from './fixtures/family/tfjs-eval.js';

const cfg = SETTINGS.config;
/** Greedy answers may differ where two logits tie within float error: PyTorch and ONNX Runtime add in other orders. */
const MAX_SCORE_GAP = 2;
/** The base's largest test accuracy on any task (it knows the skills in another wording only). */
const BASE_MAX = 0.3;
const specs = tensorSpecs(cfg);
const shapes = new Map(specs.map((t) => [t.name, t.shape]));

async function readJson<T>(rel: string): Promise<T> {
  return JSON.parse(await readFile(join(FAMILY_DIR, rel), 'utf8')) as T;
}

async function readSplit(key: string, split: 'validation' | 'test'): Promise<Example[]> {
  const text = await readFile(join(FAMILY_DIR, 'tasks', key, `${split}.jsonl`), 'utf8');
  return text
    .trimEnd()
    .split('\n')
    .map((l) => JSON.parse(l) as Example);
}

describe('model family fixture', () => {
  let family: FamilyJson;
  let lm: OnnxLm;
  const weights = new Map<string, Map<string, Float32Array>>();

  before(async () => {
    family = await readJson<FamilyJson>('family.json');
    for (const m of MODELS) weights.set(m, await readWeights(join(FAMILY_DIR, m)));
    lm = await OnnxLm.open(join(FAMILY_DIR, 'model.onnx'), cfg.vocab, shapes);
    await useBackend('wasm');
  });
  after(async () => {
    await lm.close();
  });

  it('was generated with the settings in settings.ts, and every file matches its recorded hash', async () => {
    assert.deepEqual(family.settings, SETTINGS);
    assert.deepEqual(family.models, ['base', 'math', 'finance', 'law']);
    for (const [rel, sha] of Object.entries(family.files)) {
      const got = createHash('sha256')
        .update(await readFile(join(FAMILY_DIR, rel)))
        .digest('hex');
      assert.equal(got, sha, rel);
    }
  });

  it('stores each member as a bf16 LLaMA checkpoint with config.json and a char tokenizer', async () => {
    for (const m of MODELS) {
      const ckpt = await Checkpoint.open(join(FAMILY_DIR, m));
      try {
        assert.deepEqual(
          ckpt.tensors().map((t) => [t.name, t.dtype, t.shape]),
          specs.map((s) => [s.name, 'BF16', s.shape]),
        );
      } finally {
        await ckpt.close();
      }
      assert.deepEqual(await readJson(`${m}/config.json`), llamaConfigJson(cfg, SETTINGS.initStd));
      const tok = await readJson<ReturnType<typeof tokenizerJson>>(`${m}/tokenizer.json`);
      assert.deepEqual(tok, tokenizerJson());
      assert.deepEqual([tok.vocab[tok.pad], tok.vocab[tok.bos], tok.vocab[tok.eos]], ['<pad>', '<bos>', '<eos>']);
    }
  });

  it('has disjoint validation and test splits of distinct prompts, as the generator draws them', async () => {
    const splits = allSplits(SETTINGS);
    for (const t of TASKS) {
      const v = await readSplit(taskKey(t), 'validation');
      const te = await readSplit(taskKey(t), 'test');
      assert.deepEqual(v, splits.get(taskKey(t))!.validation);
      assert.deepEqual(te, splits.get(taskKey(t))!.test);
      assert.equal(new Set([...v, ...te].map((e) => e.prompt)).size, v.length + te.length);
      for (const e of [...v, ...te]) {
        assert.ok(e.answer.length >= 1 && e.answer.length <= 4, `${taskKey(t)}: answer ${e.answer}`);
        assert.ok(e.prompt.length + e.answer.length + 2 <= cfg.maxPositions, `${taskKey(t)}: ${e.prompt}`);
      }
    }
  });

  it('has an ONNX graph whose initializers are the base weights under checkpoint names, also graph inputs', async () => {
    const model = onnxProto.onnx.ModelProto.decode(await readFile(join(FAMILY_DIR, 'model.onnx')));
    const graph = model.graph!;
    const initializers = graph.initializer ?? [];
    assert.deepEqual(
      initializers.map((t) => t.name),
      specs.map((s) => s.name),
    );
    assert.deepEqual(
      (graph.input ?? []).map((i) => i.name),
      ['input_ids', ...specs.map((s) => s.name)],
    );
    assert.deepEqual(
      (graph.output ?? []).map((o) => o.name),
      ['logits'],
    );
    const base = weights.get('base')!;
    for (const t of initializers) {
      assert.deepEqual((t.dims ?? []).map(Number), shapes.get(t.name!));
      const got = new Float32Array(new Uint8Array(t.rawData ?? []).buffer);
      assert.deepEqual(got, base.get(t.name!), t.name!);
    }
    // The graph is a pure function of the config and the base weights.
    assert.ok(
      Buffer.from(buildOnnx(cfg, base)).equals(await readFile(join(FAMILY_DIR, 'model.onnx'))),
      'model.onnx differs from a fresh export',
    );
  });

  it('gives the same logits in ONNX Runtime as in TensorFlow.js, for the base and a fine-tune', async () => {
    const r = rng(12345);
    const prompts = TASKS.flatMap((t) => [t.sample(r).prompt, t.decoy(r).prompt]);
    const B = prompts.length;
    const T = Math.max(...prompts.map((p) => p.length + 1));
    const ids = new Int32Array(B * T);
    prompts.forEach((p, b) => ids.set([BOS, ...encode(p)], b * T));
    const fromOnnx: Float32Array[] = [];
    for (const m of ['base', 'law']) {
      const ws = weights.get(m)!;
      const tw = toTensors(cfg, ws);
      const expected = tf.tidy(() => forward(tw, tf.tensor2d(ids, [B, T], 'int32'), cfg).dataSync());
      for (const t of Object.values(tw)) t.dispose();
      // The base's weights are the graph's initializers; a fine-tune's are fed.
      const got = await lm.logits(
        BigInt64Array.from(ids, (x) => BigInt(x)),
        B,
        T,
        m === 'base' ? undefined : ws,
      );
      assert.equal(got.length, expected.length);
      let worst = 0;
      for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i]! - expected[i]!));
      assert.ok(worst < 1e-3, `${m}: max |ONNX - TF.js| = ${worst}`);
      fromOnnx.push(got);
    }
    // Fed weights take effect (onnxruntime-node drops feeds for initializers that are also inputs).
    const [a, b] = fromOnnx as [Float32Array, Float32Array];
    assert.ok(
      a.some((x, i) => Math.abs(x - b[i]!) > 0.1),
      "the fine-tune gives the base's logits",
    );
  });

  it('gives the same greedy answers in ONNX Runtime as in TensorFlow.js on a sample of every test split', async () => {
    for (const m of MODELS) {
      const ws = weights.get(m)!;
      const tw = toTensors(cfg, ws);
      try {
        for (const t of TASKS) {
          const prompts = (await readSplit(taskKey(t), 'test')).slice(0, 25).map((e) => e.prompt);
          assert.deepEqual(
            await lm.greedy(prompts, SETTINGS.maxNewTokens, ws),
            greedyTf(cfg, tw, prompts, SETTINGS.maxNewTokens),
            `${m} on ${taskKey(t)}`,
          );
        }
      } finally {
        for (const t of Object.values(tw)) t.dispose();
      }
    }
  });

  it('reproduces the accuracies in family.json by greedy decoding with ONNX Runtime', async () => {
    for (const m of MODELS) {
      const ws = weights.get(m)!;
      for (const t of TASKS) {
        const rec = family.accuracy[m]?.[taskKey(t)];
        assert.ok(rec !== undefined, `${m} ${taskKey(t)} recorded`);
        for (const split of ['test', 'validation'] as const) {
          const examples = await readSplit(taskKey(t), split);
          assert.equal(rec[split].total, examples.length);
          const got = await lm.score(examples, SETTINGS.maxNewTokens, ws);
          assert.deepEqual({ ...got, total: examples.length }, rec[split], `${m} on ${taskKey(t)} ${split}`);
        }
      }
    }
  });

  it('scores every test split in ONNX Runtime as the PyTorch trainer scored it', () => {
    for (const m of MODELS) {
      for (const t of TASKS) {
        const py = family.trainer.testCorrect[m]?.[taskKey(t)];
        const ort = family.accuracy[m]![taskKey(t)]!.test.correct;
        assert.ok(
          py !== undefined && Math.abs(py - ort) <= MAX_SCORE_GAP,
          `${m} on ${taskKey(t)}: PyTorch ${py}, ONNX Runtime ${ort}`,
        );
      }
    }
  });

  it('meets goal 1: each fine-tune at least 90% on its own tasks, the base far below', () => {
    const acc = (m: string, key: string): number =>
      family.accuracy[m]![key]!.test.correct / family.accuracy[m]![key]!.test.total;
    for (const t of TASKS) {
      assert.ok(acc(t.domain, taskKey(t)) >= 0.9, `${t.domain} on ${taskKey(t)}: ${acc(t.domain, taskKey(t))}`);
      assert.ok(acc('base', taskKey(t)) <= BASE_MAX, `base on ${taskKey(t)}: ${acc('base', taskKey(t))}`);
    }
  });

  let merges: MergeRatios | undefined;
  const measured = async (): Promise<MergeRatios> =>
    (merges ??= await measureMerges(
      FAMILY_DIR,
      lm,
      allSplits(SETTINGS),
      family.accuracy,
      SETTINGS.pruneRate,
      SETTINGS.maxNewTokens,
    ));

  it('meets goal 2 on the committed checkpoints: the dense sum keeps every domain', async () => {
    const got = await measured();
    assert.deepEqual(got, family.merges);
    for (const d of DOMAINS) assert.ok(got.dense[d]! >= 0.8, `dense sum, ${d}: Domain-Ratio ${got.dense[d]}`);
  });

  // Goal 3 (one delta pruned at 90%, added to the base alone, keeps 0.2-0.95 of its domain) holds for magnitude in
  // every domain and for DARE (mean over seeds 0-4) in math and finance. Law's DARE at 90% keeps ≥ 0.95 of law: the
  // unmet part of goal 3 (docs/model-family.md). That is asserted too, so that a change either way fails here.
  it("meets goal 3 except law's DARE: magnitude at 90% keeps 0.2-0.95 of every domain, DARE of math and finance; DARE keeps ≥ 0.95 of law", async () => {
    const got = await measured();
    const inRange = (x: number | undefined): boolean => x !== undefined && x >= 0.2 && x <= 0.95;
    for (const d of DOMAINS)
      assert.ok(inRange(got.magnitude[d]), `magnitude at 90%, ${d}: Domain-Ratio ${got.magnitude[d]}`);
    for (const d of ['math', 'finance'])
      assert.ok(inRange(got.dare[d]), `DARE at 90% (seeds 0-4), ${d}: Domain-Ratio ${got.dare[d]}`);
    assert.ok(
      got.dare.law! >= 0.95,
      `DARE at 90% (seeds 0-4), law: Domain-Ratio ${got.dare.law}, now below 0.95: update this test and docs/model-family.md`,
    );
  });

  it('meets goal 4: deltas small next to the weights, as in the paper', () => {
    const base = weights.get('base')!;
    for (const d of DOMAINS) {
      const s = deltaStats(linearNames(cfg), weights.get(d)!, base);
      assert.deepEqual(s, family.deltas[d]!.linear, d);
      // The paper's 10%-90% spread is about ±0.0011-0.0016 against weights of RMS ≈ 0.02 (‖Δ‖/‖W‖ ≈ 0.05-0.08).
      assert.ok(s.relativeNorm <= 0.1, `${d}: ‖Δ‖/‖W‖ ${s.relativeNorm}`);
      assert.ok(
        Math.max(-s.signed.p10, s.signed.p90) <= 0.1 * s.weightsRms,
        `${d}: 10%-90% ${s.signed.p10}..${s.signed.p90}, weights RMS ${s.weightsRms}`,
      );
    }
  });
});
