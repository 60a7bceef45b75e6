import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { after, before, describe, it } from 'node:test';
import { bf16ToF32, encodeFromF32, f16ToF32, f32ToBf16, f32ToF16 } from '../proto/safetensors/dtype.js';
import {
  OnnxEvaluator,
  OnnxModelError,
  ProviderUnavailableError,
  TaskDataError,
  weightsAsGraphInputs,
  type CheckpointShapes,
  type OnnxEvaluatorOptions,
  type WeightSource,
} from '../server/dpa/onnx/index.js';
import {
  onnx,
  type IGraphProto,
  type INodeProto,
  type ITensorProto,
  type IValueInfoProto,
} from '../server/dpa/onnx/onnx-schema.js';

// ---------------------------------------------------------------------------
// A toy causal LM, built as ONNX with onnx-proto and computed again in TypeScript:
//   emb = E[ids]  (Gather)   ctx = cumsum(emb, seq)  (CumSum: position t sees tokens ≤ t)
//   logits = 0.5 · relu(ctx · W_upᵀ) · W_lmᵀ
// Weights have Hugging Face names and shapes ([out, in] for linear layers, hence the Transposes).
// ---------------------------------------------------------------------------

const V = 10; // "<pad>", "<bos>", "<eos>", a, b, c, d, e, space, =
const D = 8;
const H = 12;
const SCALE = 0.5;
const NAMES = {
  embed: 'model.embed_tokens.weight',
  up: 'model.layers.0.mlp.up_proj.weight',
  lmHead: 'lm_head.weight',
} as const;
const SHAPES: CheckpointShapes = { [NAMES.embed]: [V, D], [NAMES.up]: [H, D], [NAMES.lmHead]: [V, H] };
const TOKENIZER = {
  type: 'char',
  vocab: ['<pad>', '<bos>', '<eos>', 'a', 'b', 'c', 'd', 'e', ' ', '='],
  bos: 1,
  eos: 2,
  pad: 0,
};
const CHAR_IDS = new Map(TOKENIZER.vocab.map((c, i) => [c, i]));

interface ToyWeights {
  embed: Float32Array;
  up: Float32Array;
  lmHead: Float32Array;
}
type Dt = 'float32' | 'float16' | 'bfloat16';

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomWeights(seed: number): ToyWeights {
  const r = rng(seed);
  const u = (n: number): Float32Array => Float32Array.from({ length: n }, () => r() * 2 - 1);
  return { embed: u(V * D), up: u(H * D), lmHead: u(V * H) };
}

function clone(w: ToyWeights): ToyWeights {
  return { embed: w.embed.slice(), up: w.up.slice(), lmHead: w.lmHead.slice() };
}

/** The values a model of `dtype` actually holds. */
function rounded(w: ToyWeights, dtype: Dt): ToyWeights {
  const f = (x: Float32Array): Float32Array =>
    dtype === 'float32' ? x : dtype === 'float16' ? f16ToF32(f32ToF16(x)) : bf16ToF32(f32ToBf16(x));
  return { embed: f(w.embed), up: f(w.up), lmHead: f(w.lmHead) };
}

function source(w: ToyWeights, asked?: string[]): WeightSource {
  const m = new Map([
    [NAMES.embed, w.embed],
    [NAMES.up, w.up],
    [NAMES.lmHead, w.lmHead],
  ]);
  return (name) => {
    asked?.push(name);
    const v = m.get(name as typeof NAMES.embed);
    return v === undefined ? Promise.reject(new Error(`no checkpoint tensor ${name}`)) : Promise.resolve(v);
  };
}

/** Reference logits of every position of `ids`, in float64. */
function refLogits(w: ToyWeights, ids: readonly number[]): Float64Array[] {
  const ctx = new Float64Array(D);
  return ids.map((id) => {
    for (let d = 0; d < D; d++) ctx[d]! += w.embed[id * D + d]!;
    const a = new Float64Array(H);
    for (let j = 0; j < H; j++) {
      let s = 0;
      for (let d = 0; d < D; d++) s += ctx[d]! * w.up[j * D + d]!;
      a[j] = Math.max(0, s);
    }
    const z = new Float64Array(V);
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let j = 0; j < H; j++) s += a[j]! * w.lmHead[v * H + j]!;
      z[v] = SCALE * s;
    }
    return z;
  });
}

function argmaxMargin(z: Float64Array): { best: number; margin: number } {
  let best = 0;
  for (let v = 1; v < z.length; v++) if (z[v]! > z[best]!) best = v;
  let second = -Infinity;
  for (let v = 0; v < z.length; v++) if (v !== best) second = Math.max(second, z[v]!);
  return { best, margin: z[best]! - second };
}

/** Greedy decoding token by token (no teacher forcing), with the smallest argmax margin seen. */
function refGreedy(w: ToyWeights, context: readonly number[], n: number): { tokens: number[]; margin: number } {
  const seq = [...context];
  const tokens: number[] = [];
  let margin = Infinity;
  for (let k = 0; k < n; k++) {
    const m = argmaxMargin(refLogits(w, seq).at(-1)!);
    margin = Math.min(margin, m.margin);
    tokens.push(m.best);
    seq.push(m.best);
  }
  return { tokens, margin };
}

function refLogLikelihood(w: ToyWeights, context: readonly number[], answer: readonly number[]): number {
  const z = refLogits(w, [...context, ...answer.slice(0, -1)]);
  let s = 0;
  answer.forEach((tok, k) => {
    const row = z[context.length - 1 + k]!;
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((acc, x) => acc + Math.exp(x - m), 0));
    s += row[tok]! - lse;
  });
  return s / answer.length;
}

const encode = (s: string): number[] => [...s].map((c) => CHAR_IDS.get(c)!);
const decode = (ids: readonly number[]): string => ids.map((i) => TOKENIZER.vocab[i]!).join('');
const context = (prompt: string): number[] => [TOKENIZER.bos, ...encode(prompt)];

// --- ONNX construction ------------------------------------------------------

const T = onnx.TensorProto.DataType;
const A = onnx.AttributeProto.AttributeType;
const CODE: Record<Dt, number> = { float32: T.FLOAT, float16: T.FLOAT16, bfloat16: T.BFLOAT16 };
const ST = { float32: 'F32', float16: 'F16', bfloat16: 'BF16' } as const;

function valueInfo(name: string, elemType: number, dims: (number | string)[]): IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: dims.map((d) => (typeof d === 'string' ? { dimParam: d } : { dimValue: d })) },
      },
    },
  };
}

interface ToyModelOptions {
  /** Weights as plain initializers, as graph inputs without values, or as initializers also listed as graph inputs. */
  form: 'initializers' | 'inputs' | 'both';
  /** Graph names of the weights. @default the checkpoint names */
  names?: { embed: string; up: string; lmHead: string };
  dtype?: Dt;
  /** Values stored in the initializers. */
  stored?: ToyWeights;
  /** Adds an `attention_mask` input that multiplies the embeddings. */
  attentionMask?: boolean;
  /** Stores `logit_scale` and the embedding as external data in this folder. */
  externalDir?: string;
  /** Declares a fixed sequence length. */
  fixedSeq?: number;
}

function toyModel(o: ToyModelOptions): Uint8Array {
  const dtype = o.dtype ?? 'float32';
  const names = o.names ?? NAMES;
  const stored = o.stored ?? randomWeights(999);
  const nodes: INodeProto[] = [];
  const inits: ITensorProto[] = [];
  const inputs: IValueInfoProto[] = [valueInfo('input_ids', T.INT64, ['batch', o.fixedSeq ?? 'seq'])];
  const weight = (name: string, values: Float32Array, dims: number[]): string => {
    if (o.form !== 'inputs')
      inits.push({ name, dataType: CODE[dtype], dims, rawData: encodeFromF32(values, ST[dtype]).slice() });
    if (o.form !== 'initializers') inputs.push(valueInfo(name, CODE[dtype], dims));
    if (dtype === 'float32') return name;
    nodes.push({
      opType: 'Cast',
      input: [name],
      output: [`${name}/f32`],
      attribute: [{ name: 'to', type: A.INT, i: T.FLOAT }],
    });
    return `${name}/f32`;
  };
  const E = weight(names.embed, stored.embed, [V, D]);
  const W1 = weight(names.up, stored.up, [H, D]);
  const LM = weight(names.lmHead, stored.lmHead, [V, H]);
  inits.push({
    name: 'cumsum_axis',
    dataType: T.INT64,
    dims: [],
    rawData: new Uint8Array(BigInt64Array.of(1n).buffer),
  });
  inits.push({
    name: 'logit_scale',
    dataType: T.FLOAT,
    dims: [],
    rawData: new Uint8Array(Float32Array.of(SCALE).buffer),
  });
  if (o.externalDir !== undefined) {
    // logit_scale at offset 0, the embedding after it (the evaluator must read the first and skip the second).
    const scale = inits.find((t) => t.name === 'logit_scale')!;
    scale.rawData = null;
    scale.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL;
    scale.externalData = [
      { key: 'location', value: 'toy.data' },
      { key: 'offset', value: '0' },
      { key: 'length', value: '4' },
    ];
    const emb = inits.find((t) => t.name === names.embed)!;
    emb.rawData = null;
    emb.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL;
    emb.externalData = [
      { key: 'location', value: 'toy.data' },
      { key: 'offset', value: '4' },
    ];
  }
  nodes.push({ opType: 'Gather', input: [E, 'input_ids'], output: ['emb'] });
  let emb = 'emb';
  if (o.attentionMask === true) {
    inputs.push(valueInfo('attention_mask', T.INT64, ['batch', 'seq']));
    inits.push({
      name: 'mask_axis',
      dataType: T.INT64,
      dims: [1],
      rawData: new Uint8Array(BigInt64Array.of(2n).buffer),
    });
    nodes.push({
      opType: 'Cast',
      input: ['attention_mask'],
      output: ['mask_f'],
      attribute: [{ name: 'to', type: A.INT, i: T.FLOAT }],
    });
    nodes.push({ opType: 'Unsqueeze', input: ['mask_f', 'mask_axis'], output: ['mask3'] });
    nodes.push({ opType: 'Mul', input: ['emb', 'mask3'], output: ['emb_masked'] });
    emb = 'emb_masked';
  }
  nodes.push({ opType: 'CumSum', input: [emb, 'cumsum_axis'], output: ['ctx'] });
  nodes.push({
    opType: 'Transpose',
    input: [W1],
    output: ['w1t'],
    attribute: [{ name: 'perm', type: A.INTS, ints: [1, 0] }],
  });
  nodes.push({ opType: 'MatMul', input: ['ctx', 'w1t'], output: ['h'] });
  nodes.push({ opType: 'Relu', input: ['h'], output: ['act'] });
  nodes.push({
    opType: 'Transpose',
    input: [LM],
    output: ['lmt'],
    attribute: [{ name: 'perm', type: A.INTS, ints: [1, 0] }],
  });
  nodes.push({ opType: 'MatMul', input: ['act', 'lmt'], output: ['z'] });
  nodes.push({ opType: 'Mul', input: ['z', 'logit_scale'], output: ['logits'] });
  const graph: IGraphProto = {
    name: 'toy-lm',
    node: nodes,
    initializer: inits,
    input: inputs,
    output: [valueInfo('logits', T.FLOAT, ['batch', 'seq', V])],
  };
  return onnx.ModelProto.encode({
    irVersion: 8,
    producerName: 'onnx-evaluator.test',
    opsetImport: [{ domain: '', version: 17 }],
    graph,
  }).finish();
}

// --- fixtures -----------------------------------------------------------------

let dir: string;
let tokenizerPath: string;
const W_A = randomWeights(1);
const W_B = randomWeights(2);

async function writeModel(name: string, o: ToyModelOptions): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, toyModel(o));
  return path;
}

async function writeJsonl(name: string, lines: readonly (string | object)[]): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n') + '\n');
  return path;
}

async function withEvaluator<T>(o: OnnxEvaluatorOptions, fn: (e: OnnxEvaluator) => Promise<T>): Promise<T> {
  const e = await OnnxEvaluator.create(o);
  try {
    return await fn(e);
  } finally {
    await e.close();
  }
}

function assertClose(actual: Float32Array, expected: readonly Float64Array[], what: string): void {
  assert.equal(actual.length, expected.length * V, `${what}: length`);
  expected.forEach((row, p) => {
    const tol = 1e-5 * Math.max(1, ...row.map(Math.abs));
    row.forEach((x, v) => {
      const y = actual[p * V + v]!;
      assert.ok(Math.abs(y - x) <= tol, `${what}: position ${p}, token ${v}: ${y} vs ${x}`);
    });
  });
}

/** Prompts whose greedy continuation under `w` is plain characters with a clear argmax at every step. */
function greedyExamples(w: ToyWeights, count: number, seed: number): { prompt: string; greedy: string }[] {
  const r = rng(seed);
  const out: { prompt: string; greedy: string }[] = [];
  while (out.length < count) {
    const len = 1 + Math.floor(r() * 6);
    const prompt = Array.from({ length: len }, () => 'abcde '[Math.floor(r() * 6)]).join('') + '=';
    const n = 1 + (out.length % 3);
    const g = refGreedy(w, context(prompt), n);
    if (g.margin > 1e-3 && g.tokens.every((t) => t >= 3)) out.push({ prompt, greedy: decode(g.tokens) });
  }
  return out;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-onnx-'));
  tokenizerPath = join(dir, 'tokenizer.json');
  await writeFile(tokenizerPath, JSON.stringify(TOKENIZER));
});
after(() => rm(dir, { recursive: true, force: true }));

// ---------------------------------------------------------------------------

describe('ONNX evaluator: weight injection', () => {
  const seqs = [context('abc='), context('e d='), context('aaaa')];

  for (const [form, injection] of [
    ['initializers', 'inputs'],
    ['initializers', 'rewrite'],
    ['inputs', 'inputs'],
    ['inputs', 'rewrite'],
    ['both', 'inputs'],
    ['both', 'rewrite'],
  ] as const) {
    it(`weights as ${form}, injected by ${injection}: logits equal the TypeScript network for each candidate`, async () => {
      const modelPath = await writeModel(`toy-${form}.onnx`, { form });
      await withEvaluator({ modelPath, checkpointShapes: SHAPES, injection }, async (e) => {
        assert.equal(e.injection, injection);
        assert.deepEqual([...e.weightNames].sort(), Object.values(NAMES).sort());
        for (const [label, w] of [
          ['A', W_A],
          ['B', W_B],
          ['A again', W_A],
        ] as const) {
          const out = await e.logits(source(w), seqs);
          assert.deepEqual(out.dims, [3, 5, V]);
          seqs.forEach((s, b) =>
            assertClose(out.data.subarray(b * 5 * V, (b + 1) * 5 * V), refLogits(w, s), `candidate ${label}, row ${b}`),
          );
        }
      });
    });
  }

  it('detects the injection: inputs for float32 and float16, rewrite for bfloat16', async () => {
    for (const [dtype, expected] of [
      ['float32', 'inputs'],
      ['float16', 'inputs'],
      ['bfloat16', 'rewrite'],
    ] as const) {
      const modelPath = await writeModel(`toy-${dtype}.onnx`, { form: 'initializers', dtype });
      await withEvaluator({ modelPath, checkpointShapes: SHAPES }, async (e) => {
        assert.equal(e.injection, expected, dtype);
        const out = await e.logits(source(W_B), [seqs[0]!]);
        // The model holds the candidate in its own dtype, rounded to nearest even like the merge writes it.
        assertClose(out.data, refLogits(rounded(W_B, dtype), seqs[0]!), dtype);
      });
    }
  });

  it('reads external data of constants and never the weights', async () => {
    const externalDir = await mkdtemp(join(dir, 'ext-'));
    const stored = randomWeights(5);
    await writeFile(
      join(externalDir, 'toy.data'),
      Buffer.concat([Buffer.from(Float32Array.of(SCALE).buffer), Buffer.from(stored.embed.buffer)]),
    );
    const modelPath = join(externalDir, 'toy.onnx');
    await writeFile(modelPath, toyModel({ form: 'initializers', stored, externalDir }));
    await withEvaluator({ modelPath, checkpointShapes: SHAPES }, async (e) => {
      const out = await e.logits(source(W_A), [seqs[1]!]);
      assertClose(out.data, refLogits(W_A, seqs[1]!), 'external');
    });
  });

  it('fills an attention_mask input with ones', async () => {
    const modelPath = await writeModel('toy-mask.onnx', { form: 'initializers', attentionMask: true });
    await withEvaluator({ modelPath, checkpointShapes: SHAPES }, async (e) => {
      const out = await e.logits(source(W_A), seqs);
      seqs.forEach((s, b) => assertClose(out.data.subarray(b * 5 * V, (b + 1) * 5 * V), refLogits(W_A, s), `row ${b}`));
    });
  });

  it('without checkpoint shapes, takes every float initializer as a weight', async () => {
    const modelPath = await writeModel('toy-plain.onnx', { form: 'initializers' });
    await withEvaluator({ modelPath }, async (e) => {
      assert.deepEqual([...e.weightNames].sort(), [...Object.values(NAMES), 'logit_scale'].sort());
      // So the weight source is asked for the constant too; doubling it doubles the logits.
      const withScale: WeightSource = (name) =>
        name === 'logit_scale' ? Promise.resolve(Float32Array.of(2 * SCALE)) : source(W_A)(name);
      const expected = refLogits(W_A, seqs[0]!).map((row) => row.map((x) => 2 * x));
      assertClose((await e.logits(withScale, [seqs[0]!])).data, expected, 'scale as a weight');
    });
  });

  it('weightsAsGraphInputs converts a model to the graph-input form', async () => {
    const bytes = toyModel({ form: 'initializers' });
    const converted = weightsAsGraphInputs(bytes, Object.values(NAMES));
    const g = onnx.ModelProto.decode(converted).graph!;
    assert.deepEqual(g.initializer!.map((t) => t.name).sort(), ['cumsum_axis', 'logit_scale']);
    assert.deepEqual(
      g.input!.map((v) => v.name),
      ['input_ids', ...Object.values(NAMES)],
    );
    const modelPath = join(dir, 'toy-converted.onnx');
    await writeFile(modelPath, converted);
    await withEvaluator({ modelPath, checkpointShapes: SHAPES }, async (e) => {
      assertClose((await e.logits(source(W_B), [seqs[2]!])).data, refLogits(W_B, seqs[2]!), 'converted');
    });
  });
});

describe('ONNX evaluator: metrics', () => {
  let modelPath: string;
  let emTask: string;
  let expectedEm: number;
  let examples: { prompt: string; answer: string }[];
  before(async () => {
    modelPath = await writeModel('toy-metrics.onnx', { form: 'initializers' });
    const greedy = greedyExamples(W_A, 9, 7);
    // Two in three answers are the greedy continuation; the others differ in their last token only,
    // so that a match on a prefix does not count.
    examples = greedy.map((g, i) => {
      if (i % 3 !== 2) return { prompt: g.prompt, answer: g.greedy };
      const last = g.greedy.at(-1)!;
      return { prompt: g.prompt, answer: g.greedy.slice(0, -1) + (last === 'a' ? 'b' : 'a') };
    });
    expectedEm = 6 / 9;
    emTask = await writeJsonl('em.jsonl', examples);
  });

  /** Reference scores under `w`: greedy decoding token by token, and mean log-likelihood. */
  function reference(w: ToyWeights, ex: readonly { prompt: string; answer: string }[]): { em: number; ll: number } {
    let em = 0;
    let ll = 0;
    for (const x of ex) {
      const a = encode(x.answer);
      if (refGreedy(w, context(x.prompt), a.length).tokens.join() === a.join()) em++;
      ll += refLogLikelihood(w, context(x.prompt), a);
    }
    return { em: em / ex.length, ll: ll / ex.length };
  }

  it('exact match and log-likelihood equal the TypeScript reference, whatever the batch size', async () => {
    const ref = reference(W_A, examples);
    assert.equal(ref.em, expectedEm);
    for (const batchSize of [1, 2, 32]) {
      await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES, batchSize }, async (e) => {
        const tasks = [{ name: 'arith', file: emTask }];
        const em = await e.evaluate(source(W_A), tasks, 'exact_match');
        assert.deepEqual(em, { arith: expectedEm }, `batch ${batchSize}`);
        const ll = await e.evaluate(source(W_A), tasks, 'log_likelihood');
        assert.ok(
          Math.abs(ll.arith! - ref.ll) <= 1e-5 * Math.abs(ref.ll),
          `batch ${batchSize}: ${ll.arith} vs ${ref.ll}`,
        );
      });
    }
  });

  it('changing a weight changes the scores as the reference does', async () => {
    // Raise the lm_head row of "a": activations are ≥ 0, so "a" becomes likelier at every position.
    const boosted = clone(W_A);
    const a = CHAR_IDS.get('a')!;
    for (let j = 0; j < H; j++) boosted.lmHead[a * H + j]! += 3;
    const aTask = examples.map((x) => ({ prompt: x.prompt, answer: 'a'.repeat(x.answer.length) }));
    const aFile = await writeJsonl('all-a.jsonl', aTask);
    await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES }, async (e) => {
      const tasks = await e.loadTasks([
        { name: 'arith', file: emTask },
        { name: 'all-a', file: aFile },
      ]);
      const before = await e.evaluate(source(W_A), tasks, 'log_likelihood');
      const afterLl = await e.evaluate(source(boosted), tasks, 'log_likelihood');
      const afterEm = await e.evaluate(source(boosted), tasks, 'exact_match');
      assert.ok(
        afterLl['all-a']! > before['all-a']!,
        `log-likelihood of "a" answers rises: ${before['all-a']} → ${afterLl['all-a']}`,
      );
      const refA = reference(boosted, aTask);
      const refArith = reference(boosted, examples);
      assert.ok(Math.abs(afterLl['all-a']! - refA.ll) <= 1e-5 * Math.abs(refA.ll));
      assert.ok(Math.abs(afterLl.arith! - refArith.ll) <= 1e-5 * Math.abs(refArith.ll));
      assert.deepEqual(afterEm, { arith: refArith.em, 'all-a': refA.em });
      assert.equal(refA.em, 1, 'the boost makes greedy decoding emit only "a"');
    });
  });

  it('takes tasks as token ids without a tokenizer', async () => {
    const ids = examples.map((x) => ({ prompt_ids: context(x.prompt), answer_ids: encode(x.answer) }));
    const file = await writeJsonl('ids.jsonl', ids);
    await withEvaluator({ modelPath, checkpointShapes: SHAPES }, async (e) => {
      assert.deepEqual(await e.evaluate(source(W_A), [{ name: 'ids', file }], 'exact_match'), { ids: expectedEm });
    });
  });

  it('keeps the last maxSequence tokens of a long example', async () => {
    const long = [{ prompt: 'abcdeabcde=', answer: 'ab' }];
    const file = await writeJsonl('long.jsonl', long);
    const maxSequence = 6;
    const full = [...context(long[0]!.prompt), ...encode('a')];
    const kept = full.slice(full.length - maxSequence);
    const expected = refLogLikelihood(W_A, kept.slice(0, -1), encode('ab'));
    await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES, maxSequence }, async (e) => {
      const got = (await e.evaluate(source(W_A), [{ name: 'long', file }], 'log_likelihood')).long!;
      assert.ok(Math.abs(got - expected) <= 1e-5 * Math.abs(expected), `${got} vs ${expected}`);
    });
  });

  it('name map: a model with other initializer names scores the same', async () => {
    const names = { embed: 'E', up: 'W_up', lmHead: 'onnx::MatMul_7' };
    const mapped = await writeModel('toy-mapped.onnx', { form: 'initializers', names });
    const mapFile = join(dir, 'name-map.json');
    await writeFile(
      mapFile,
      JSON.stringify({ [NAMES.embed]: names.embed, [NAMES.up]: names.up, [NAMES.lmHead]: names.lmHead }),
    );
    const tasks = [{ name: 'arith', file: emTask }];
    const direct = await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES }, (e) =>
      e.evaluate(source(W_B), tasks, 'log_likelihood'),
    );
    for (const nameMap of [mapFile, { [NAMES.embed]: 'E', [NAMES.up]: 'W_up', [NAMES.lmHead]: 'onnx::MatMul_7' }]) {
      const asked: string[] = [];
      const viaMap = await withEvaluator({ modelPath: mapped, tokenizerPath, nameMap }, (e) =>
        e.evaluate(source(W_B, asked), tasks, 'log_likelihood'),
      );
      assert.deepEqual(viaMap, direct);
      assert.deepEqual(asked.sort(), Object.values(NAMES).sort());
    }
  });

  it('stops at an aborted signal', async () => {
    await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES }, async (e) => {
      await assert.rejects(
        e.evaluate(source(W_A), [{ name: 'arith', file: emTask }], 'exact_match', AbortSignal.abort()),
        { name: 'AbortError' },
      );
    });
  });

  it('timing: one evaluation of 256 examples', async (t) => {
    const many = Array.from({ length: 256 }, (_, i) => examples[i % examples.length]!);
    const file = await writeJsonl('many.jsonl', many);
    await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES }, async (e) => {
      const tasks = await e.loadTasks([{ name: 'many', file }]);
      await e.evaluate(source(W_A), tasks, 'exact_match'); // warm-up
      const t0 = performance.now();
      const s = await e.evaluate(source(W_A), tasks, 'log_likelihood');
      const ms = performance.now() - t0;
      t.diagnostic(`log_likelihood on 256 examples (inputs injection, batch 32): ${ms.toFixed(1)} ms`);
      assert.ok(Number.isFinite(s.many));
    });
    await withEvaluator({ modelPath, tokenizerPath, checkpointShapes: SHAPES, injection: 'rewrite' }, async (e) => {
      const tasks = await e.loadTasks([{ name: 'many', file }]);
      const t0 = performance.now();
      await e.evaluate(source(W_A), tasks, 'log_likelihood');
      t.diagnostic(
        `same with rewrite injection (one session per candidate): ${(performance.now() - t0).toFixed(1)} ms`,
      );
    });
  });
});

describe('ONNX evaluator: errors', () => {
  let modelPath: string;
  before(async () => {
    modelPath = await writeModel('toy-errors.onnx', {
      form: 'initializers',
      names: { embed: NAMES.embed, up: 'W_up', lmHead: NAMES.lmHead },
    });
  });
  const nameMap = { [NAMES.up]: 'W_up' };

  it('shape mismatch names the checkpoint tensor and the initializer', async () => {
    await assert.rejects(
      OnnxEvaluator.create({ modelPath, nameMap, checkpointShapes: { ...SHAPES, [NAMES.up]: [D, H] } }),
      (e: unknown) =>
        e instanceof OnnxModelError &&
        e.message.includes(`"${NAMES.up}" has shape [${D}, ${H}]`) &&
        e.message.includes(`"W_up" has shape [${H}, ${D}]`) &&
        e.message.includes(modelPath),
    );
  });

  it('a candidate tensor of the wrong size names both tensors', async () => {
    await withEvaluator({ modelPath, nameMap, checkpointShapes: SHAPES }, async (e) => {
      const bad = clone(W_A);
      bad.up = bad.up.subarray(1);
      await assert.rejects(
        e.logits(source(bad), [[1, 3]]),
        (err: unknown) =>
          err instanceof OnnxModelError && err.message.includes(NAMES.up) && err.message.includes('"W_up"'),
      );
      // The evaluator is still usable afterwards.
      assertClose((await e.logits(source(W_A), [[1, 3]])).data, refLogits(W_A, [1, 3]), 'after error');
    });
  });

  it('unknown initializer in the name map', async () => {
    await assert.rejects(
      OnnxEvaluator.create({ modelPath, nameMap: { [NAMES.up]: 'W_nope' }, checkpointShapes: SHAPES }),
      (e: unknown) => e instanceof OnnxModelError && e.message.includes('"W_nope"') && e.message.includes(NAMES.up),
    );
  });

  it('unknown character names the task file and line', async () => {
    const file = await writeJsonl('bad-char.jsonl', [
      { prompt: 'ab=', answer: 'c' },
      { prompt: 'ab€=', answer: 'c' },
    ]);
    await withEvaluator({ modelPath, nameMap, checkpointShapes: SHAPES, tokenizerPath }, async (e) => {
      await assert.rejects(
        e.loadTasks([{ name: 't', file }]),
        (err: unknown) =>
          err instanceof TaskDataError &&
          err.file === file &&
          err.line === 2 &&
          err.message.includes('"€"') &&
          err.message.startsWith(`${file}:2:`),
      );
    });
  });

  it('bad JSONL line names the file and line', async () => {
    const file = await writeJsonl('bad-line.jsonl', [
      { prompt: 'ab=', answer: 'c' },
      '',
      '{"prompt": "ab"',
      { prompt: 'a=', answer: 'b' },
    ]);
    await withEvaluator({ modelPath, nameMap, checkpointShapes: SHAPES, tokenizerPath }, async (e) => {
      await assert.rejects(
        e.evaluate(source(W_A), [{ name: 't', file }], 'exact_match'),
        (err: unknown) => err instanceof TaskDataError && err.line === 3 && err.message.includes('not valid JSON'),
      );
      const missing = await writeJsonl('missing-field.jsonl', [{ prompt: 'ab=' }]);
      await assert.rejects(
        e.loadTasks([{ name: 't', file: missing }]),
        (err: unknown) => err instanceof TaskDataError && err.line === 1 && err.message.includes('"answer"'),
      );
    });
  });

  it('the model contract: missing input or output, fixed axes, BFLOAT16 fed as inputs', async () => {
    await assert.rejects(
      OnnxEvaluator.create({ modelPath, nameMap, checkpointShapes: SHAPES, inputName: 'tokens' }),
      (e: unknown) =>
        e instanceof OnnxModelError && e.message.includes('no input "tokens"') && e.message.includes('input_ids'),
    );
    await assert.rejects(
      OnnxEvaluator.create({ modelPath, nameMap, checkpointShapes: SHAPES, outputName: 'scores' }),
      (e: unknown) => e instanceof OnnxModelError && e.message.includes('no output "scores"'),
    );
    const fixed = await writeModel('toy-fixed.onnx', { form: 'initializers', fixedSeq: 16 });
    await assert.rejects(
      OnnxEvaluator.create({ modelPath: fixed, checkpointShapes: SHAPES }),
      (e: unknown) => e instanceof OnnxModelError && e.message.includes('dynamic axes'),
    );
    const bf16 = await writeModel('toy-bf16.onnx', { form: 'initializers', dtype: 'bfloat16' });
    await assert.rejects(
      OnnxEvaluator.create({ modelPath: bf16, checkpointShapes: SHAPES, injection: 'inputs' }),
      (e: unknown) => e instanceof OnnxModelError && e.message.includes('BFLOAT16'),
    );
  });

  it("provider cuda without ONNX Runtime's CUDA binaries gives a clear error", async (t) => {
    try {
      const e = await OnnxEvaluator.create({ modelPath, nameMap, checkpointShapes: SHAPES, provider: 'cuda' });
      await e.close();
      t.skip('this machine has the CUDA execution provider');
    } catch (e) {
      assert.ok(e instanceof ProviderUnavailableError, String(e));
      assert.match(e.message, /CUDA execution provider is not installed/);
    }
  });
});
