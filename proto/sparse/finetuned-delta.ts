/**
 * Turns fine-tuned weights (VALUE_KIND_FINETUNED values) into deltas Δ = F − B in fp32 from the base checkpoint:
 * the one conversion every reader of uploaded values as deltas uses. See docs/design/sparse-chunks.md.
 */
import { BaseDeltaError, FormatError } from '../errors.js';
import { ValueKind, type DeltaHeader } from '../gen/dppa/v1/sparse.js';
import { bytesPerElement, decodeToF32, type Dtype } from '../safetensors/dtype.js';
import type { Checkpoint } from '../safetensors/reader.js';
import type { DecodedChunk } from './chunk-codec.js';

/** Base elements read at a time: 2-4 MiB, whatever the chunk's span. */
const WINDOW_ELEMENTS = 1 << 20;

/** True if a header's values are fine-tuned weights, to be turned into deltas with {@link FinetunedToDelta}. */
export function carriesFinetuned(header: DeltaHeader): boolean {
  return header.valueKind === ValueKind.VALUE_KIND_FINETUNED;
}

/**
 * Turns one tensor's fine-tuned weights into deltas, reading the base a window at a time (widened to fp32 once per
 * window): {@link FinetunedToDelta.convert} replaces the values, {@link FinetunedToDelta.addScaled} adds them scaled
 * without writing them back. One per tensor; chunks may come in any order.
 */
export class FinetunedToDelta {
  private readonly dtype: Dtype;
  private readonly numel: number;
  /** The window as stored, and in fp32 (a view of `raw` for an F32 base); allocated at the first load. */
  private raw: Uint8Array | undefined;
  private window: Float32Array = new Float32Array(0);
  private start = 0;
  private count = 0;

  /** Scratch for reading a bf16 bit pattern as fp32. */
  private readonly word = new Int32Array(1);
  private readonly float = new Float32Array(this.word.buffer);

  constructor(
    private readonly base: Checkpoint,
    private readonly tensor: string,
    /** File named in errors (the `.dppa` or spool file). */
    private readonly file?: string,
    /**
     * The whole base tensor's bf16 bit patterns, when the caller holds them (a BF16 base): read from there, one
     * element at a time, instead of through windows. @default none
     */
    private readonly baseBits?: Uint16Array,
  ) {
    const info = base.info(tensor);
    this.dtype = info.dtype;
    this.numel = info.numel;
  }

  /**
   * Replaces each value F of `chunk` (in place) by F − B, computed once and rounded to fp32.
   * @throws BaseDeltaError naming the tensor and position where F − B is not a finite fp32 number.
   */
  convert(chunk: DecodedChunk, signal?: AbortSignal): Promise<void> {
    return this.runs(chunk, signal, (i, win, start, end) =>
      subtractRun(
        chunk.values,
        chunk.range ? undefined : chunk.positions,
        chunk.firstPosition,
        i,
        chunk.values.length,
        win,
        start,
        end,
      ),
    );
  }

  /**
   * `acc[p] += scale · (F − B)` for every entry of `chunk`, F − B rounded to fp32 first and each sum rounded once
   * to fp32: the same as {@link convert} then `addChunkScaled`, without writing the deltas back. `chunk` is left
   * unchanged. Entries before a failing one may have been added.
   * @throws BaseDeltaError as {@link convert}.
   */
  async addScaled(acc: Float32Array, chunk: DecodedChunk, scale: number, signal?: AbortSignal): Promise<void> {
    if (acc.length < this.numel)
      throw new RangeError(`the accumulator holds ${acc.length} elements, the tensor ${this.numel}`);
    if (this.baseBits !== undefined) {
      this.checkInside(chunk);
      const bad = addBitsRun(acc, chunk, this.baseBits, scale, this.word, this.float);
      if (bad >= 0) this.failAt(chunk, bad, this.baseBits);
      return;
    }
    await this.runs(chunk, signal, (i, win, start, end) =>
      addRun(
        acc,
        chunk.values,
        chunk.range ? undefined : chunk.positions,
        chunk.firstPosition,
        i,
        chunk.values.length,
        win,
        start,
        end,
        scale,
      ),
    );
  }

  /**
   * {@link addScaled} where `acc` still holds the base, in fp32, at every position of `chunk` (the first party's
   * entries of a tensor: no party has added there yet, and a party keeps a position once), so B is read from
   * `acc` itself: no window, the same sums.
   * @throws BaseDeltaError as {@link convert}.
   */
  addScaledOverBase(acc: Float32Array, chunk: DecodedChunk, scale: number): void {
    if (acc.length < this.numel)
      throw new RangeError(`the accumulator holds ${acc.length} elements, the tensor ${this.numel}`);
    this.checkInside(chunk);
    const bad = addOverBaseRun(acc, chunk, scale);
    if (bad >= 0) this.failAt(chunk, bad, acc);
  }

  /** @throws FormatError if the chunk's last position is outside the tensor. */
  private checkInside(chunk: DecodedChunk): void {
    const n = chunk.values.length;
    if (n === 0) return;
    const last = chunk.range ? chunk.firstPosition + n - 1 : chunk.positions[n - 1]!;
    if (last >= this.numel)
      throw new FormatError(`position ${last} is outside the base tensor (${this.numel} elements)`, this.where());
  }

  /** Throws for entry `i` of `chunk`, whose base value is at its position in `base`. */
  private failAt(chunk: DecodedChunk, i: number, base: Uint16Array | Float32Array): never {
    const p = chunk.range ? chunk.firstPosition + i : chunk.positions[i]!;
    let b = base[p]!;
    if (base instanceof Uint16Array) {
      this.word[0] = b << 16;
      b = this.float[0]!;
    }
    this.notFinite(p, chunk.values[i]!, b);
  }

  /**
   * Calls `run` for each stretch of the chunk's entries inside one window, loading the window first; `run` takes
   * the first entry's index and returns the index after the last it handled, or `~i` for an entry i whose
   * difference is not finite.
   */
  private async runs(
    chunk: DecodedChunk,
    signal: AbortSignal | undefined,
    run: (i: number, window: Float32Array, start: number, end: number) => number,
  ): Promise<void> {
    const n = chunk.values.length;
    const first = chunk.firstPosition;
    const positions = chunk.range ? undefined : chunk.positions;
    for (let i = 0; i < n;) {
      const p = positions === undefined ? first + i : positions[i]!;
      if (p < this.start || p >= this.start + this.count) await this.load(p, signal);
      const next = run(i, this.window, this.start, this.start + this.count);
      if (next < 0) {
        const bad = ~next;
        const q = positions === undefined ? first + bad : positions[bad]!;
        this.notFinite(q, chunk.values[bad]!, this.window[q - this.start]!);
      }
      i = next;
    }
  }

  private async load(p: number, signal?: AbortSignal): Promise<void> {
    if (p >= this.numel)
      throw new FormatError(`position ${p} is outside the base tensor (${this.numel} elements)`, this.where());
    const size = bytesPerElement(this.dtype);
    if (this.raw === undefined) {
      const elements = Math.max(1, Math.min(WINDOW_ELEMENTS, this.numel));
      this.raw = new Uint8Array(elements * size);
      this.window = this.dtype === 'F32' ? new Float32Array(this.raw.buffer) : new Float32Array(elements);
    }
    const count = Math.min(this.window.length, this.numel - p);
    await this.base.readRawRange(this.tensor, p * size, count * size, {
      into: this.raw,
      ...(signal === undefined ? {} : { signal }),
    });
    if (this.dtype !== 'F32')
      decodeToF32(this.raw.subarray(0, count * size), this.dtype, this.window.subarray(0, count));
    this.start = p;
    this.count = count;
  }

  private notFinite(p: number, f: number, b: number): never {
    throw new BaseDeltaError(
      `flat position ${p}: the fine-tuned weight ${f} minus the base weight ${b} is not a finite fp32 number`,
      this.where(),
    );
  }

  private where(): { file?: string; tensor: string } {
    return this.file === undefined ? { tensor: this.tensor } : { file: this.file, tensor: this.tensor };
  }
}

// The two kernels below handle entries from `i` (of `n`) on while their position is inside the window [start, end) (a RANGE
// chunk's positions are first + i; others' strictly increase), and return the index after the last one handled, or
// ~i (negative) for an entry whose F − B, rounded to fp32, is NaN or an infinity.

/** `values[i] = fround(F − B)`. */
function subtractRun(
  values: Float32Array,
  positions: Float64Array | undefined,
  first: number,
  i: number,
  n: number,
  win: Float32Array,
  start: number,
  end: number,
): number {
  if (positions === undefined) {
    const stop = Math.min(n, end - first);
    for (let k = first + i - start; i < stop; i++, k++) {
      const d = Math.fround(values[i]! - win[k]!);
      if (d - d !== 0) return ~i;
      values[i] = d;
    }
    return i;
  }
  for (; i < n; i++) {
    const p = positions[i]!;
    if (p >= end) break;
    const d = Math.fround(values[i]! - win[p - start]!);
    if (d - d !== 0) return ~i;
    values[i] = d;
  }
  return i;
}

/** `acc[p] += scale · fround(F − B)`, each sum formed in float64 and rounded once to fp32 (as addChunkScaled). */
function addRun(
  acc: Float32Array,
  values: Float32Array,
  positions: Float64Array | undefined,
  first: number,
  i: number,
  n: number,
  win: Float32Array,
  start: number,
  end: number,
  scale: number,
): number {
  if (positions === undefined) {
    const stop = Math.min(n, end - first);
    for (let k = first + i - start, p = first + i; i < stop; i++, k++, p++) {
      const d = Math.fround(values[i]! - win[k]!);
      if (d - d !== 0) return ~i;
      acc[p] = acc[p]! + scale * d;
    }
    return i;
  }
  for (; i < n; i++) {
    const p = positions[i]!;
    if (p >= end) break;
    const d = Math.fround(values[i]! - win[p - start]!);
    if (d - d !== 0) return ~i;
    acc[p] = acc[p]! + scale * d;
  }
  return i;
}

/**
 * `acc[p] += scale · fround(F − B)` for every entry, B read from the bf16 bit patterns `bits` (through `word`, whose
 * memory `float` shares). @returns -1, or the index of the first entry whose F − B is not finite (those before it
 * are added).
 */
function addBitsRun(
  acc: Float32Array,
  chunk: DecodedChunk,
  bits: Uint16Array,
  scale: number,
  word: Int32Array,
  float: Float32Array,
): number {
  const { values } = chunk;
  const n = values.length;
  if (chunk.range) {
    for (let i = 0, p = chunk.firstPosition; i < n; i++, p++) {
      word[0] = bits[p]! << 16;
      const d = Math.fround(values[i]! - float[0]!);
      if (d - d !== 0) return i;
      acc[p] = acc[p]! + scale * d;
    }
    return -1;
  }
  const { positions } = chunk;
  for (let i = 0; i < n; i++) {
    const p = positions[i]!;
    word[0] = bits[p]! << 16;
    const d = Math.fround(values[i]! - float[0]!);
    if (d - d !== 0) return i;
    acc[p] = acc[p]! + scale * d;
  }
  return -1;
}

/** `acc[p] += scale · fround(F − acc[p])` for every entry (acc holding the base there). @returns As {@link addBitsRun}. */
function addOverBaseRun(acc: Float32Array, chunk: DecodedChunk, scale: number): number {
  const { values } = chunk;
  const n = values.length;
  if (chunk.range) {
    for (let i = 0, p = chunk.firstPosition; i < n; i++, p++) {
      const b = acc[p]!;
      const d = Math.fround(values[i]! - b);
      if (d - d !== 0) return i;
      acc[p] = b + scale * d;
    }
    return -1;
  }
  const { positions } = chunk;
  for (let i = 0; i < n; i++) {
    const p = positions[i]!;
    const b = acc[p]!;
    const d = Math.fround(values[i]! - b);
    if (d - d !== 0) return i;
    acc[p] = b + scale * d;
  }
  return -1;
}
