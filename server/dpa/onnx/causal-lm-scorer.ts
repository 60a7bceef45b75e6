/**
 * Scores a causal language model on a task (`exact_match`, `log_likelihood`) from a forward pass alone, one
 * teacher-forced pass per batch, never padding. See docs/design/onnx-evaluator.md.
 */
import { TaskDataError } from './errors.js';
import type { LoadedTask, TaskExample } from './tasks.js';

/** The metric of a task's score; higher is better for both. */
export type Metric = 'exact_match' | 'log_likelihood';

/** Every metric, in a fixed order. */
export const METRICS: readonly Metric[] = ['exact_match', 'log_likelihood'];

/** Logits of one batch: `data` is `[batch, seq, vocab]` row-major. */
export interface BatchLogits {
  data: Float32Array;
  vocab: number;
}

/**
 * Runs the model on `batch` sequences of `seq` tokens each (`ids` row-major).
 * @returns The logits of every position.
 */
export type ForwardFn = (ids: BigInt64Array, batch: number, seq: number) => Promise<BatchLogits>;

/** How a task is batched. */
export interface ScoreOptions {
  /** Most sequences in one forward pass. */
  batchSize: number;
  /** Longest sequence the model takes; longer inputs lose tokens on the left. `undefined`: no limit. */
  maxSequence: number | undefined;
  /** Vocabulary size if known before the first pass: checks token ids and bounds the logits memory. */
  vocabSize: number | undefined;
  /** Largest logits tensor of one pass, in bytes; lowers the batch for long sequences. */
  maxLogitsBytes: number;
  signal?: AbortSignal | undefined;
}

/**
 * The model input of one example: context and all answer tokens but the last,
 * keeping the last `maxSequence` tokens if it is longer.
 * @throws TaskDataError if the answer alone does not fit.
 */
export function exampleInput(ex: TaskExample, file: string, maxSequence: number | undefined): number[] {
  const full = [...ex.context, ...ex.answer.slice(0, -1)];
  if (maxSequence === undefined || full.length <= maxSequence) return full;
  // Each answer token needs the position before it, so the answer's length is the least that still scores it.
  if (ex.answer.length > maxSequence) {
    throw new TaskDataError(
      `the answer has ${ex.answer.length} tokens, more than the model's maximum sequence of ${maxSequence}`,
      { file, line: ex.line },
    );
  }
  return full.slice(full.length - maxSequence);
}

/** Index of the largest of `n` values from `off`; the lowest index wins ties, as torch.argmax does. */
function argmax(x: Float32Array, off: number, n: number): number {
  let best = 0;
  let bestV = x[off]!;
  for (let j = 1; j < n; j++) {
    const v = x[off + j]!;
    if (v > bestV || (Number.isNaN(bestV) && !Number.isNaN(v))) {
      best = j;
      bestV = v;
    }
  }
  return best;
}

/** `log Σ exp x` over `n` values from `off`, in float64 so that long vocabularies lose nothing. */
function logSumExp(x: Float32Array, off: number, n: number): number {
  let m = -Infinity;
  for (let j = 0; j < n; j++) m = Math.max(m, x[off + j]!);
  if (m === -Infinity || !Number.isFinite(m)) return m;
  let s = 0;
  for (let j = 0; j < n; j++) s += Math.exp(x[off + j]! - m);
  return m + Math.log(s);
}

function checkIds(
  ids: readonly number[],
  answer: readonly number[],
  vocab: number,
  task: LoadedTask,
  line: number,
): void {
  for (const id of ids)
    if (id >= vocab)
      throw new TaskDataError(`token id ${id} is outside the model's vocabulary of ${vocab}`, {
        file: task.file,
        line,
      });
  for (const id of answer)
    if (id >= vocab)
      throw new TaskDataError(`answer token id ${id} is outside the model's vocabulary of ${vocab}`, {
        file: task.file,
        line,
      });
}

/**
 * Checks, before any forward pass, what scoring would find wrong with a task
 * on this model: token ids outside the vocabulary (when the model's output
 * declares its size), answers longer than `maxSequence`.
 * @throws TaskDataError naming file and line.
 */
export function checkTask(task: LoadedTask, vocab: number | undefined, maxSequence: number | undefined): void {
  for (const ex of task.examples) {
    const input = exampleInput(ex, task.file, maxSequence);
    if (vocab !== undefined) checkIds(input, ex.answer, vocab, task, ex.line);
  }
}

/**
 * Scores every example of a task.
 * @returns One value per example, in file order: 1 or 0 for `exact_match`, the mean answer-token log-probability for `log_likelihood`.
 * @throws TaskDataError for an example that does not fit the model.
 */
export async function scoreExamples(
  task: LoadedTask,
  metric: Metric,
  forward: ForwardFn,
  o: ScoreOptions,
): Promise<Float64Array> {
  const inputs = task.examples.map((ex) => exampleInput(ex, task.file, o.maxSequence));
  // Group by length so that no sequence is padded; ascending lengths and file order keep runs deterministic.
  const byLength = new Map<number, number[]>();
  inputs.forEach((ids, i) => {
    const g = byLength.get(ids.length);
    if (g === undefined) byLength.set(ids.length, [i]);
    else g.push(i);
  });
  let vocab = o.vocabSize;
  const result = new Float64Array(task.examples.length);
  for (const len of [...byLength.keys()].sort((a, b) => a - b)) {
    const group = byLength.get(len)!;
    let start = 0;
    while (start < group.length) {
      o.signal?.throwIfAborted();
      const cap = vocab === undefined ? o.batchSize : Math.max(1, Math.floor(o.maxLogitsBytes / (len * vocab * 4)));
      const rows = group.slice(start, start + Math.min(o.batchSize, cap));
      start += rows.length;
      if (vocab !== undefined)
        for (const i of rows) checkIds(inputs[i]!, task.examples[i]!.answer, vocab, task, task.examples[i]!.line);
      const ids = new BigInt64Array(rows.length * len);
      rows.forEach((i, r) => inputs[i]!.forEach((t, p) => (ids[r * len + p] = BigInt(t))));
      const out = await forward(ids, rows.length, len);
      vocab = out.vocab;
      rows.forEach((i, r) => {
        const ex = task.examples[i]!;
        checkIds([], ex.answer, out.vocab, task, ex.line);
        const a = ex.answer.length;
        let matched = true;
        let logProb = 0;
        for (let k = 0; k < a; k++) {
          const off = (r * len + len - a + k) * out.vocab;
          const want = ex.answer[k]!;
          if (metric === 'exact_match') {
            if (argmax(out.data, off, out.vocab) !== want) {
              matched = false;
              break;
            }
          } else {
            logProb += out.data[off + want]! - logSumExp(out.data, off, out.vocab);
          }
        }
        result[i] = metric === 'exact_match' ? (matched ? 1 : 0) : logProb / a;
      });
    }
  }
  return result;
}

/**
 * Scores a task: the mean over its examples of {@link scoreExamples}, summed in file order.
 * @throws TaskDataError for an example that does not fit the model.
 */
export async function scoreTask(
  task: LoadedTask,
  metric: Metric,
  forward: ForwardFn,
  o: ScoreOptions,
): Promise<number> {
  const per = await scoreExamples(task, metric, forward, o);
  let s = 0;
  for (const v of per) s += v;
  return s / per.length;
}
