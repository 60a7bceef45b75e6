/**
 * What `npm run demo` and `npm run repro` share: the tiny model family, in-memory pruned deltas, merges and scores
 * computed exactly as the server computes them, and the Domain-Ratio tables. See docs/design/examples.md.
 */
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { decodeToF32, encodeFromF32 } from '../../proto/safetensors/dtype.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { domainRatio, partitionFactor } from '../../proto/algorithm/index.js';
import { addScaled, carriesFinetuned, readDeltaFile, TensorAssembler } from '../../proto/sparse/index.js';
import { OnnxEvaluator, type LoadedTask } from '../../server/dpa/onnx/index.js';
export { readWeights } from '../../test/fixtures/family/onnx-eval.js';

/** The family's folder: base/, math/, finance/, law/, tasks/, model.onnx. */
export const FAMILY = fileURLToPath(new URL('../../test/fixtures/family/', import.meta.url));

/** The three domains and their two tasks each (a Domain-Ratio is the geometric mean of two Task-Ratios). */
export const DOMAINS = { math: ['add', 'max'], finance: ['percent', 'interest'], law: ['article', 'statute'] } as const;
export type Domain = keyof typeof DOMAINS;
export const DOMAIN_NAMES = Object.keys(DOMAINS) as Domain[];

/** A split of every task: `validation` for the DPA search, `test` for reports. */
export type Split = 'validation' | 'test';

/** Checkpoint folder of the base or a fine-tune. */
export function memberDir(member: 'base' | Domain): string {
  return join(FAMILY, member);
}

/** JSONL file of a task's split. */
export function taskFile(domain: Domain, task: string, split: Split): string {
  return join(FAMILY, 'tasks', domain, task, `${split}.jsonl`);
}

/** The task files of a domain's split, by task name (what a job's `onnx.party_tasks` takes). */
export function domainTaskFiles(domain: Domain, split: Split): Record<string, string> {
  return Object.fromEntries(DOMAINS[domain].map((t) => [t, taskFile(domain, t, split)]));
}

/** DARE drops entries at random: every DARE figure of the family (`family.json`, `npm run repro`) is the mean over these seeds. */
export const DARE_SEEDS: readonly number[] = [0, 1, 2, 3, 4];

/** The mean of `f(seed)` over `seeds`, one seed after another. */
export async function meanOverSeeds(seeds: readonly number[], f: (seed: number) => Promise<number>): Promise<number> {
  let sum = 0;
  for (const seed of seeds) sum += await f(seed);
  return sum / seeds.length;
}

/** Float32 values of a checkpoint's tensors, by name. */
export type Weights = ReadonlyMap<string, Float32Array>;

/** One partition's kept entries of a tensor: `positions` (flat indices) and their values. */
export interface SparseEntries {
  partition: number;
  positions: Float64Array;
  values: Float32Array;
}

/** A pruned delta in memory: its levels (one partition per level) and each sent tensor's entries. */
export interface SparseDelta {
  levels: number[];
  tensors: Map<string, SparseEntries[]>;
}

/**
 * Reads a `.dppa` file (checksums verified) into memory as deltas: a file that carries fine-tuned weights
 * (value kind FINETUNED, docs/formats.md) gets `F − base` in fp32, as the server forms it.
 */
export async function readSparseDelta(file: string, base: Weights): Promise<SparseDelta> {
  const delta: SparseDelta = { levels: [], tensors: new Map() };
  let assembler: TensorAssembler | undefined;
  let entries: SparseEntries[] = [];
  let finetuned = false;
  for await (const record of readDeltaFile(file)) {
    if (record.header !== undefined) {
      delta.levels = record.header.levels;
      finetuned = carriesFinetuned(record.header);
      continue;
    }
    if (record.tensorBegin !== undefined) {
      assembler = new TensorAssembler({ file, entries: 'stream' });
      entries = [];
    }
    if (assembler === undefined) throw new Error(`${file}: a record comes before any tensor begins`);
    const chunk = assembler.push(record);
    // Copied: a decoder may hand out arrays it reuses for the next chunk.
    if (chunk !== undefined) {
      const positions = Float64Array.from(chunk.positions);
      const values = Float32Array.from(chunk.values);
      if (finetuned) {
        const b = base.get(assembler.name!)!;
        for (let i = 0; i < values.length; i++) values[i] = values[i]! - b[positions[i]!]!;
      }
      entries.push({ partition: chunk.partition, positions, values });
    }
    if (assembler.complete) delta.tensors.set(assembler.name!, entries);
  }
  return delta;
}

/** The dense delta `finetuned − base` of every tensor, as one partition-0 block per tensor (factor 1). */
export function denseDelta(base: Weights, finetuned: Weights): SparseDelta {
  const tensors = new Map<string, SparseEntries[]>();
  for (const [name, b] of base) {
    const f = finetuned.get(name)!;
    const values = new Float32Array(b.length);
    for (let i = 0; i < b.length; i++) values[i] = f[i]! - b[i]!;
    tensors.set(name, [{ partition: 0, positions: Float64Array.from(values.keys()), values }]);
  }
  return { levels: [], tensors };
}

/** One party's share of a merge: its delta and one factor per partition (default all 1). */
export interface Contribution {
  delta: SparseDelta;
  factors?: readonly number[];
}

/**
 * `base + Σ_i Σ_p f_ip · Δ_ip`, accumulated in fp32 entry by entry (as the
 * server's merge and `dppa apply` do) and rounded to BF16, the base's dtype;
 * outside tensors (partition 0) get factor 1.
 */
export function mergeWeights(base: Weights, contributions: readonly Contribution[]): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const [name, b] of base) {
    const acc = Float32Array.from(b);
    for (const c of contributions) {
      const factors = c.factors ?? c.delta.levels.map(() => 1);
      for (const e of c.delta.tensors.get(name) ?? [])
        addScaled(acc, e.positions, e.values, partitionFactor(factors, e.partition, false));
    }
    out.set(name, decodeToF32(encodeFromF32(acc, 'BF16'), 'BF16', acc));
  }
  return out;
}

/** Per-task scores (fractions in [0, 1]) of one domain. */
export type TaskScores = Record<string, number>;

/** Scores weights on the family's tasks with the server's ONNX evaluator. */
export class FamilyScorer {
  private constructor(
    private readonly evaluator: OnnxEvaluator,
    private readonly tasks: ReadonlyMap<Domain, LoadedTask[]>,
    /** Number of `score` calls so far. */
    public evaluations = 0,
  ) {}

  /** Opens `model.onnx` (one ONNX Runtime thread) and loads the tasks of `split` of `domains` (default: all). */
  static async open(split: Split, opts: { threads?: number; domains?: readonly Domain[] } = {}): Promise<FamilyScorer> {
    const base = await Checkpoint.open(memberDir('base'));
    const checkpointShapes = Object.fromEntries(base.tensors().map((t) => [t.name, t.shape]));
    await base.close();
    const evaluator = await OnnxEvaluator.create({
      modelPath: join(FAMILY, 'model.onnx'),
      tokenizerPath: join(memberDir('base'), 'tokenizer.json'),
      checkpointShapes,
      batchSize: 256,
      intraOpThreads: opts.threads ?? 1,
    });
    const tasks = new Map<Domain, LoadedTask[]>();
    for (const d of opts.domains ?? DOMAIN_NAMES)
      tasks.set(
        d,
        await evaluator.loadTasks(Object.entries(domainTaskFiles(d, split)).map(([name, file]) => ({ name, file }))),
      );
    return new FamilyScorer(evaluator, tasks);
  }

  /** Exact-match accuracy of `weights` on each task of `domain`. @throws Error for a domain `open` did not load. */
  async score(weights: Weights, domain: Domain): Promise<TaskScores> {
    const tasks = this.tasks.get(domain);
    if (tasks === undefined)
      throw new Error(`domain ${domain} not loaded (open({ domains }) loaded ${[...this.tasks.keys()].join(', ')})`);
    this.evaluations++;
    return this.evaluator.evaluate((name) => Promise.resolve(weights.get(name)!), tasks, 'exact_match');
  }

  /** {@link score} on every domain. */
  async scoreAll(weights: Weights): Promise<Record<Domain, TaskScores>> {
    const out = {} as Record<Domain, TaskScores>;
    for (const d of DOMAIN_NAMES) out[d] = await this.score(weights, d);
    return out;
  }

  async close(): Promise<void> {
    await this.evaluator.close();
  }
}

/**
 * Domain-Ratio in percent (paper eq. 7-8): the geometric mean over the
 * domain's tasks of `merged accuracy / fine-tune accuracy`; the server's own
 * `domainRatio`, so that reports and the DPA search agree.
 */
export function domainRatioPercent(scores: TaskScores, dense: TaskScores): number {
  return 100 * domainRatio(scores, dense);
}

/** A number as the paper prints Domain-Ratios (two decimals), or `—` when there is none. */
export function fmt(x: number | undefined): string {
  return x === undefined || !Number.isFinite(x) ? '—' : x.toFixed(2);
}

/** A Markdown table (also readable as plain text), columns padded to their widest cell. */
export function markdownTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    `| ${cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  return [
    line(header),
    `| ${widths.map((w, i) => (i === 0 ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`,
    ...rows.map(line),
  ].join('\n');
}
