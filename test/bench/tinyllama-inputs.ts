/**
 * The benchmarks' model: a generated LLaMA checkpoint with TinyLlama-1.1B's
 * shapes (22 layers, hidden 2048, intermediate 5632, vocab 32000, 4
 * key/value heads: k/v 256×2048; bf16, sharded at ~1 GB) and three
 * fine-tunes, written once to `.bench/server/tinyllama-<layers>l/` (about
 * 2.2 GB per checkpoint) and reused by later runs of any benchmark.
 */
import { existsSync, readFileSync, statfsSync } from 'node:fs';
import { mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CheckpointWriter, planLayout } from '../../proto/safetensors/index.js';

const root = new URL('../..', import.meta.url).pathname;
const benchDir = join(root, '.bench', 'server');

interface TensorSpec {
  name: string;
  shape: number[];
  layer: number;
}

/** The model of a number of layers: its shapes, tensors and folder. */
export interface TinyLlama {
  shape: { layers: number; hidden: number; intermediate: number; vocab: number; heads: number; kvHeads: number };
  /** Rows of k_proj and v_proj. */
  kvDim: number;
  tensors: TensorSpec[];
  /** Parameters per checkpoint. */
  params: number;
  /** `.bench/server/tinyllama-<layers>l`: `base`, `ft1`, `ft2`, `ft3`. */
  dir: string;
}

const CHECKPOINTS = ['base', 'ft1', 'ft2', 'ft3'];
const GEN_VERSION = 1;

/** TinyLlama-1.1B's shapes with `layers` layers. */
export function tinyLlama(layers: number): TinyLlama {
  const shape = { layers, hidden: 2048, intermediate: 5632, vocab: 32000, heads: 32, kvHeads: 4 };
  const kvDim = (shape.hidden / shape.heads) * shape.kvHeads;
  const { hidden: h, intermediate: m, vocab: v } = shape;
  const tensors: TensorSpec[] = [{ name: 'model.embed_tokens.weight', shape: [v, h], layer: -1 }];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`;
    tensors.push(
      { name: `${p}self_attn.q_proj.weight`, shape: [h, h], layer: l },
      { name: `${p}self_attn.k_proj.weight`, shape: [kvDim, h], layer: l },
      { name: `${p}self_attn.v_proj.weight`, shape: [kvDim, h], layer: l },
      { name: `${p}self_attn.o_proj.weight`, shape: [h, h], layer: l },
      { name: `${p}mlp.gate_proj.weight`, shape: [m, h], layer: l },
      { name: `${p}mlp.up_proj.weight`, shape: [m, h], layer: l },
      { name: `${p}mlp.down_proj.weight`, shape: [h, m], layer: l },
      { name: `${p}input_layernorm.weight`, shape: [h], layer: l },
      { name: `${p}post_attention_layernorm.weight`, shape: [h], layer: l },
    );
  }
  tensors.push(
    { name: 'model.norm.weight', shape: [h], layer: -1 },
    { name: 'lm_head.weight', shape: [v, h], layer: -1 },
  );
  const params = tensors.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
  return { shape, kvDim, tensors, params, dir: join(benchDir, `tinyllama-${layers}l`) };
}

/** Rounds fp32 values (as their bits) to bf16 bits, nearest even. */
function toBf16(bits: Uint32Array, m: number, out: Uint16Array, at: number): void {
  for (let i = 0; i < m; i++) {
    const u = bits[i]!;
    out[at + i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
}

/**
 * One tensor of the base and of the three fine-tunes at once, in bf16:
 * base values triangular in ±0.05 (norms 1); each fine-tune adds a
 * triangular delta of ±0.004 with outliers (×8..16) whose share varies with
 * layer, projection and party, so that DP gives the layers different rates.
 * One xorshift32 draw per base entry and two per fine-tuned entry.
 */
function generateTensor(t: TensorSpec, index: number): Uint16Array[] {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const outs = CHECKPOINTS.map(() => new Uint16Array(n));
  const CH = 1 << 16;
  const base = new Float32Array(CH);
  const baseBits = new Uint32Array(base.buffer);
  const ft = new Float32Array(CH);
  const ftBits = new Uint32Array(ft.buffer);
  let x = (0x9e3779b9 ^ Math.imul(index + 1, 0x85ebca6b)) | 0 || 1;
  const dense = t.shape.length === 1;
  const thresholds = [1, 2, 3].map((k) => {
    const share = t.layer < 0 ? 0.001 : 0.002 + 0.004 * ((t.layer * 7 + t.name.length + k) % 5);
    return Math.floor(share * 4294967296);
  });
  const outlier = 8 + (Math.max(0, t.layer) % 3) * 4;
  for (let off = 0; off < n; off += CH) {
    const m = Math.min(CH, n - off);
    if (dense) {
      base.fill(1, 0, m);
    } else {
      for (let i = 0; i < m; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        base[i] = ((x & 0xffff) + ((x >>> 16) & 0xffff) - 65535) * (0.05 / 65536);
      }
    }
    toBf16(baseBits, m, outs[0]!, off);
    for (let k = 0; k < 3; k++) {
      const thr = thresholds[k]!;
      for (let i = 0; i < m; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        const d = ((x & 0xffff) + ((x >>> 16) & 0xffff) - 65535) * (0.004 / 65536);
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        ft[i] = base[i]! + (x >>> 0 < thr ? d * outlier : d);
      }
      toBf16(ftBits, m, outs[k + 1]!, off);
    }
  }
  return outs;
}

/**
 * Writes the base and three fine-tunes to `model.dir` unless a complete set
 * with the same specification is there.
 * @returns Seconds spent generating; undefined when the inputs were reused.
 */
export async function generateTinyLlama(model: TinyLlama): Promise<number | undefined> {
  const inputs = model.dir;
  const genMarker = join(inputs, 'generated.json');
  const genSpec = JSON.stringify({ version: GEN_VERSION, shape: model.shape, dtype: 'BF16', shardBytes: 1e9 });
  if (existsSync(genMarker) && readFileSync(genMarker, 'utf8') === genSpec) return undefined;
  const need = 4 * model.params * 2 * 1.05;
  const free = freeBytes(benchDir);
  if (free < need + 6e9)
    throw new Error(
      `not enough disk space in ${benchDir}: ${(free / 1e9).toFixed(1)} GB free, need about ${((need + 6e9) / 1e9).toFixed(1)} GB`,
    );
  console.log(
    `generating ${inputs}: base + 3 fine-tunes, ${(model.params / 1e9).toFixed(2)}B parameters each, bf16 (${((4 * model.params * 2) / 1e9).toFixed(1)} GB) …`,
  );
  const t0 = performance.now();
  await rm(inputs, { recursive: true, force: true });
  await mkdir(inputs, { recursive: true });
  const layout = planLayout(
    model.tensors.map((t) => ({ name: t.name, dtype: 'BF16' as const, shape: t.shape })),
    { shardBytes: 1e9 },
  );
  const writers = await Promise.all(CHECKPOINTS.map((c) => CheckpointWriter.create(join(inputs, c), layout)));
  try {
    // Writes of one tensor overlap the generation of the next.
    let pending: Promise<void>[] = [];
    for (const [i, t] of model.tensors.entries()) {
      const data = generateTensor(t, i);
      await Promise.all(pending);
      pending = writers.map((w, k) => w.writeTensor(t.name, new Uint8Array(data[k]!.buffer)));
    }
    await Promise.all(pending);
    for (const w of writers) await w.commit();
  } finally {
    for (const w of writers) await w.abort();
  }
  const { shape } = model;
  const config = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: shape.hidden,
    intermediate_size: shape.intermediate,
    num_hidden_layers: shape.layers,
    num_attention_heads: shape.heads,
    num_key_value_heads: shape.kvHeads,
    vocab_size: shape.vocab,
    torch_dtype: 'bfloat16',
  };
  for (const c of CHECKPOINTS) {
    await writeFile(join(inputs, c, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    await writeFile(join(inputs, c, 'tokenizer.json'), '{"model": {"type": "synthetic"}}\n');
  }
  await writeFile(genMarker, genSpec);
  return (performance.now() - t0) / 1000;
}

function freeBytes(dir: string): number {
  let d = dir;
  while (!existsSync(d)) d = join(d, '..');
  const s = statfsSync(d);
  return s.bavail * s.bsize;
}

/** Bytes of the files of a flat folder. */
export async function folderBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir)) n += (await stat(join(dir, f))).size;
  return n;
}
