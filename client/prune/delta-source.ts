/**
 * The delta `Δ = F − B` of a fine-tuned checkpoint against its base, one
 * tensor at a time, in fp32 whatever the storage dtype (spec "Terms").
 */
import { FormatError } from '../../proto/errors.js';
import { Checkpoint, type TensorInfo } from '../../proto/safetensors/index.js';

/** Elements of the base read at a time: 8 MiB in fp32, a few reads in flight. */
const BLOCK_ELEMENTS = 1 << 21;

/** What to do when the fine-tuned model has more rows than the base (a resized vocabulary). */
export type VocabMismatch = 'error' | 'truncate';

/** Base and fine-tuned checkpoints do not match; lists every difference. */
export class CheckpointMismatchError extends Error {
  override name = 'CheckpointMismatchError';
  readonly problems: readonly string[];
  constructor(base: string, finetuned: string, problems: readonly string[]) {
    const shown = problems.slice(0, 20).map((p) => `  - ${p}`);
    if (problems.length > 20) shown.push(`  … and ${problems.length - 20} more`);
    super(`${finetuned} does not match its base ${base}:\n${shown.join('\n')}`);
    this.problems = problems;
  }
}

/** One tensor of the delta: its base description; the fine-tuned tensor's first `numel` elements are read. */
export interface DeltaTensor {
  info: TensorInfo;
  /** Set when the fine-tuned tensor has extra rows that `truncate` drops. */
  truncatedFrom?: readonly number[];
}

/**
 * Pairs a base and a fine-tuned checkpoint tensor by tensor.
 * Open with {@link DeltaSource.open}; close when done.
 */
export class DeltaSource {
  private constructor(
    readonly base: Checkpoint,
    readonly finetuned: Checkpoint,
    /** Tensors in the base's layout order. */
    readonly tensors: readonly DeltaTensor[],
  ) {}

  /**
   * Opens both checkpoints and checks that they hold the same tensors with the same shapes.
   * With `vocabMismatch: 'truncate'`, a fine-tuned tensor with more rows than the base
   * (same other dimensions) is compared on the base's rows only.
   * @throws CheckpointMismatchError listing missing and extra tensors and shape differences.
   * @throws FormatError / UnsupportedDtypeError from reading either checkpoint.
   */
  static async open(
    basePath: string,
    finetunedPath: string,
    opts: { vocabMismatch?: VocabMismatch } = {},
  ): Promise<DeltaSource> {
    const base = await Checkpoint.open(basePath);
    let finetuned: Checkpoint | undefined;
    try {
      finetuned = await Checkpoint.open(finetunedPath);
      const tensors = pairTensors(base, finetuned, opts.vocabMismatch ?? 'error', basePath, finetunedPath);
      return new DeltaSource(base, finetuned, tensors);
    } catch (err) {
      await finetuned?.close();
      await base.close();
      throw err;
    }
  }

  // Reused across tensors: fresh memory costs a page fault per 4 KiB on first
  // touch, which on a VM made reading several times slower. The delta buffer
  // is sized once for the largest tensor, so it is never touched afresh twice;
  // the base is read a block at a time into a small buffer.
  private deltaScratch = new Float32Array(0);
  private baseBlock = new Float32Array(0);
  private finetunedScratch = new Float32Array(0);

  /**
   * Reads `F − B` of one tensor as fp32 (exact: both inputs are widened first).
   * The result is a view of a buffer this source reuses: valid until the next call.
   * @throws FormatError naming the checkpoint file, the tensor and the position of the first
   *   non-finite weight (NaN or an infinity) in either checkpoint, or of a difference too large for fp32.
   */
  async readDelta(t: DeltaTensor, signal?: AbortSignal): Promise<Float32Array> {
    return (await this.readDeltaAndFinetuned(t, false, signal)).delta;
  }

  /**
   * As {@link DeltaSource.readDelta}, also giving the fine-tuned weights F (as fp32, exact) when `keepFinetuned`:
   * a second reused buffer, valid until the next call.
   */
  async readDeltaAndFinetuned(
    t: DeltaTensor,
    keepFinetuned: boolean,
    signal?: AbortSignal,
  ): Promise<{ delta: Float32Array; finetuned: Float32Array | undefined }> {
    const n = t.info.numel;
    if (this.deltaScratch.length < n) {
      this.deltaScratch = new Float32Array(this.tensors.reduce((m, x) => Math.max(m, x.info.numel), n));
      this.baseBlock = new Float32Array(Math.min(BLOCK_ELEMENTS, this.deltaScratch.length));
    }
    if (keepFinetuned && this.finetunedScratch.length < n)
      this.finetunedScratch = new Float32Array(this.deltaScratch.length);
    const opts = signal === undefined ? {} : { signal };
    const delta = this.deltaScratch.subarray(0, n);
    const finetuned = keepFinetuned ? this.finetunedScratch.subarray(0, n) : undefined;
    for (let start = 0; start < n; start += BLOCK_ELEMENTS) {
      const count = Math.min(BLOCK_ELEMENTS, n - start);
      const [b, f] = await Promise.all([
        this.base.readRangeF32(t.info.name, start, count, { ...opts, into: this.baseBlock }),
        this.finetuned.readRangeF32(t.info.name, start, count, { ...opts, into: (finetuned ?? delta).subarray(start) }),
      ]);
      const d = delta.subarray(start, start + count);
      let finite = true;
      for (let i = 0; i < count; i++) {
        const x = f[i]! - b[i]!;
        d[i] = x;
        // x - x is NaN exactly when x is NaN or an infinity; one test per element keeps the loop as fast.
        if (x - x !== 0) finite = false;
      }
      if (!finite) this.nonFinite(t, start, d, b);
    }
    return { delta, finetuned };
  }

  /** Throws the error of a block of a delta that is not finite everywhere (`f` holds F − B from flat position `start`, `b` the base). */
  private nonFinite(t: DeltaTensor, start: number, f: Float32Array, b: Float32Array): never {
    const i = f.findIndex((d) => !Number.isFinite(d));
    const at = start + i;
    const opts = { tensor: t.info.name };
    if (!Number.isFinite(b[i]!))
      throw new FormatError(`flat position ${at}: the base holds a non-finite weight (${b[i]})`, {
        ...opts,
        file: t.info.file,
      });
    const ft = this.finetuned.info(t.info.name).file;
    // F − B is NaN or infinite with B finite: F is, unless the difference overflows fp32.
    if (Math.abs(f[i]!) === Infinity && Number.isFinite(f[i]! + b[i]!)) {
      throw new FormatError(`flat position ${at}: the fine-tuned weight minus the base weight overflows fp32`, {
        ...opts,
        file: ft,
      });
    }
    throw new FormatError(`flat position ${at}: the fine-tuned model holds a non-finite weight (${f[i]! + b[i]!})`, {
      ...opts,
      file: ft,
    });
  }

  /** Closes both checkpoints. */
  async close(): Promise<void> {
    await Promise.all([this.base.close(), this.finetuned.close()]);
  }
}

function pairTensors(
  base: Checkpoint,
  ft: Checkpoint,
  vocab: VocabMismatch,
  basePath: string,
  ftPath: string,
): DeltaTensor[] {
  const problems: string[] = [];
  const out: DeltaTensor[] = [];
  for (const info of base.tensors()) {
    if (!ft.has(info.name)) {
      problems.push(`missing in the fine-tuned model: ${info.name}`);
      continue;
    }
    const other = ft.info(info.name);
    if (sameShape(info.shape, other.shape)) {
      out.push({ info });
    } else if (vocab === 'truncate' && extraRowsOnly(info.shape, other.shape)) {
      out.push({ info, truncatedFrom: other.shape });
    } else {
      const hint = extraRowsOnly(info.shape, other.shape)
        ? ' (a resized vocabulary? --vocab-mismatch truncate compares the base rows only)'
        : '';
      problems.push(
        `shape of ${info.name}: base [${info.shape.join(', ')}], fine-tuned [${other.shape.join(', ')}]${hint}`,
      );
    }
  }
  for (const info of ft.tensors()) {
    if (!base.has(info.name)) problems.push(`not in the base model: ${info.name}`);
  }
  if (problems.length > 0) throw new CheckpointMismatchError(basePath, ftPath, problems);
  return out;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function extraRowsOnly(base: readonly number[], ft: readonly number[]): boolean {
  return (
    base.length >= 1 && base.length === ft.length && ft[0]! > base[0]! && base.every((d, i) => i === 0 || d === ft[i])
  );
}
