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
 * Replaces the fine-tuned weights of one tensor's chunks by their deltas, reading the base a window at a time.
 * One per tensor; chunks may come in any order.
 */
export class FinetunedToDelta {
  private readonly dtype: Dtype;
  private readonly numel: number;
  private readonly raw: Uint8Array;
  /** The window as bf16 bits (BF16 base), or as fp32 (F32 base, or an F16 base decoded). */
  private readonly bits: Uint16Array;
  private readonly window: Float32Array;
  private readonly one = new Float32Array(1);
  private readonly oneBits = new Uint32Array(this.one.buffer);
  private start = 0;
  private count = 0;

  constructor(
    private readonly base: Checkpoint,
    private readonly tensor: string,
    /** File named in errors (the `.dppa` or spool file). */
    private readonly file?: string,
  ) {
    const info = base.info(tensor);
    this.dtype = info.dtype;
    this.numel = info.numel;
    const elements = Math.max(1, Math.min(WINDOW_ELEMENTS, info.numel));
    this.raw = new Uint8Array(elements * bytesPerElement(info.dtype));
    this.bits = new Uint16Array(this.raw.buffer);
    this.window = info.dtype === 'F32' ? new Float32Array(this.raw.buffer) : new Float32Array(elements);
  }

  /**
   * Replaces each value F of `chunk` (in place) by F − B, computed once and rounded to fp32.
   * @throws BaseDeltaError naming the tensor and position where F − B is not a finite fp32 number.
   */
  async convert(chunk: DecodedChunk, signal?: AbortSignal): Promise<void> {
    const { values } = chunk;
    const positions = chunk.range ? undefined : chunk.positions;
    const first = chunk.firstPosition;
    const bf16 = this.dtype === 'BF16';
    const { bits, window, one, oneBits } = this;
    let start = this.start;
    let end = start + this.count;
    for (let i = 0; i < values.length; i++) {
      const p = positions === undefined ? first + i : positions[i]!;
      if (p < start || p >= end) {
        await this.load(p, signal);
        start = this.start;
        end = start + this.count;
      }
      const k = p - start;
      let b: number;
      if (bf16) {
        oneBits[0] = bits[k]! << 16;
        b = one[0]!;
      } else {
        b = window[k]!;
      }
      const f = values[i]!;
      values[i] = f - b;
      // NaN or an infinity once rounded to fp32 (a non-finite base weight, or a difference beyond fp32).
      if (values[i]! - values[i]! !== 0) this.notFinite(p, f, b);
    }
  }

  private async load(p: number, signal?: AbortSignal): Promise<void> {
    if (p >= this.numel)
      throw new FormatError(`position ${p} is outside the base tensor (${this.numel} elements)`, this.where());
    const size = bytesPerElement(this.dtype);
    const count = Math.min(this.window.length, this.numel - p);
    await this.base.readRawRange(this.tensor, p * size, count * size, {
      into: this.raw,
      ...(signal === undefined ? {} : { signal }),
    });
    if (this.dtype === 'F16') decodeToF32(this.raw.subarray(0, count * size), 'F16', this.window.subarray(0, count));
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
