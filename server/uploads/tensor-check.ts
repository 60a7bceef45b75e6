/**
 * What an upload checks of a tensor's content beyond its record structure: values finite and bounded (deltas, or
 * F − B for fine-tuned weights), precision, partitions, no position kept twice. See docs/design/uploads.md.
 */
import { BaseDeltaError, FormatError } from '../../proto/errors.js';
import {
  TensorKind,
  type DeltaHeader,
  type SparseChunk,
  type TensorEnd,
  type TensorPlan,
} from '../../proto/gen/dppa/v1/sparse.js';
import type { Checkpoint, Dtype } from '../../proto/safetensors/index.js';
import { decodeToF32 } from '../../proto/safetensors/index.js';
import {
  carriesFinetuned,
  FinetunedToDelta,
  firstValueBeyond,
  magnitudeLimit,
  shapeNumel,
  storageDtype,
  type DecodedChunk,
} from '../../proto/sparse/index.js';

/**
 * What the checks of one upload's tensors share: the header's precision, the bound, a reusable bit set, and
 * for fine-tuned weights (VALUE_KIND_FINETUNED) the base, against which the bound is checked: `|F − B|`.
 */
export class ContentRules {
  /** Undefined for a positions-only upload (value_dtype NONE). */
  readonly dtype: Dtype | undefined;
  readonly partitions: number;
  /** The values are fine-tuned weights F: the bound applies to F − B (fp32), F itself need only be finite. */
  readonly finetuned: boolean;
  private readonly limit: number;
  private seen = new Uint8Array(0);
  /** Fine-tuned values widened, reused from chunk to chunk. */
  values = new Float32Array(0);

  /**
   * @param header - The upload's header, already checked (its value dtype is known).
   * @param maxAbsValue - Largest magnitude a delta may have (the job's `max_abs_value`).
   * @param base - The job's base, needed when the header carries fine-tuned weights ({@link needsBase}).
   */
  constructor(
    header: DeltaHeader,
    readonly maxAbsValue: number,
    readonly base?: Checkpoint,
  ) {
    this.dtype = storageDtype(header.valueDtype);
    this.partitions = header.levels.length;
    this.finetuned = ContentRules.needsBase(header) && this.dtype !== undefined;
    if (this.finetuned && base === undefined) throw new Error('ContentRules: fine-tuned values need the base');
    this.limit = this.dtype === undefined ? 0 : magnitudeLimit(this.dtype, this.finetuned ? Infinity : maxAbsValue);
  }

  /** Whether an upload with this header is checked against the base (its values are fine-tuned weights). */
  static needsBase(header: DeltaHeader): boolean {
    return carriesFinetuned(header);
  }

  /** A check of one tensor's records, which arrive in order. */
  tensor(plan: TensorPlan): TensorCheck {
    const linear = plan.kind === TensorKind.TENSOR_KIND_LINEAR;
    // Positions of different partitions can only collide in a tensor with several: mark each kept position.
    let seen: Uint8Array | undefined;
    if (linear && this.partitions > 1) {
      const bytes = Math.ceil(shapeNumel(plan.shape) / 8);
      if (this.seen.length < bytes) this.seen = new Uint8Array(bytes);
      else this.seen.fill(0, 0, bytes);
      seen = this.seen;
    }
    const toDelta = this.finetuned ? new FinetunedToDelta(this.base!, plan.name) : undefined;
    return new TensorCheck(plan.name, linear, this, this.limit, seen, toDelta);
  }
}

/** The content checks of one tensor; errors name the tensor and chunk. */
export class TensorCheck {
  constructor(
    private readonly name: string,
    private readonly linear: boolean,
    private readonly rules: ContentRules,
    private readonly limit: number,
    private readonly seen: Uint8Array | undefined,
    private readonly toDelta?: FinetunedToDelta,
  ) {}

  /**
   * Checks a chunk that TensorAssembler has decoded (its positions; its values need not be).
   * @throws FormatError naming the tensor, the chunk and what is wrong.
   */
  async chunk(raw: SparseChunk, decoded: DecodedChunk): Promise<void> {
    const label = `chunk ${raw.index}`;
    const dtype = storageDtype(raw.valueDtype);
    if (dtype !== this.rules.dtype)
      throw this.error(`${label}: values are ${dtype ?? 'NONE'}, the header says ${this.rules.dtype ?? 'NONE'}`);
    const p = decoded.partition;
    if (this.linear ? p === 0 : p !== 0) {
      const allowed = this.linear ? `1..${this.rules.partitions}` : '0';
      throw this.error(
        `${label}: partition ${p}, but ${this.linear ? 'a linear' : 'an outside'} tensor's entries are in partition ${allowed}`,
      );
    }
    const bad = dtype === undefined ? -1 : firstValueBeyond(raw.values, dtype, this.limit);
    if (bad >= 0 && dtype !== undefined) {
      const size = dtype === 'F32' ? 4 : 2;
      const value = decodeToF32(raw.values.subarray(bad * size, (bad + 1) * size), dtype)[0]!;
      const bound =
        this.toDelta === undefined ? ` with magnitude at most ${this.rules.maxAbsValue} (the job's max_abs_value)` : '';
      throw this.error(
        `${label}: the value at position ${decoded.positions[bad]} is ${value}; values must be finite${bound}`,
      );
    }
    if (this.toDelta !== undefined && dtype !== undefined) await this.checkDeltas(label, raw, decoded, dtype);
    if (this.seen !== undefined) this.mark(label, decoded);
  }

  /** Bounds the deltas F − B of a chunk of fine-tuned weights (formed in fp32 as the merge forms them). */
  private async checkDeltas(label: string, raw: SparseChunk, decoded: DecodedChunk, dtype: Dtype): Promise<void> {
    const n = decoded.count;
    const rules = this.rules;
    if (rules.values.length < n) rules.values = new Float32Array(n);
    const values = decodeToF32(raw.values, dtype, rules.values.subarray(0, n));
    try {
      await this.toDelta!.convert({ ...decoded, values });
    } catch (err) {
      // F − B not finite: the base is at fault (a non-finite weight, or one beyond fp32 from F), not the party;
      // the merge fails the job naming it (failure-policy.ts), so the chunk is taken as it is.
      if (err instanceof BaseDeltaError) return;
      throw err;
    }
    const max = this.rules.maxAbsValue;
    for (let i = 0; i < n; i++) {
      if (Math.abs(values[i]!) > max) {
        const pos = decoded.range ? decoded.firstPosition + i : decoded.positions[i]!;
        const size = dtype === 'F32' ? 4 : 2;
        const f = decodeToF32(raw.values.subarray(i * size, (i + 1) * size), dtype)[0]!;
        throw this.error(
          `${label}: the value at position ${pos} is ${f} (a fine-tuned weight, ${values[i]} from the base's); deltas must have magnitude at most ${max} (the job's max_abs_value)`,
        );
      }
    }
  }

  /**
   * Checks the tensor's end record against the tensor's kind: one count per partition.
   * @throws FormatError when `kept_per_partition` has another length.
   */
  end(end: TensorEnd): void {
    const expected = this.linear ? this.rules.partitions + 1 : 1;
    if (end.keptPerPartition.length !== expected) {
      throw this.error(
        `tensor end lists ${end.keptPerPartition.length} partition count(s), ${this.linear ? 'a linear' : 'an outside'} tensor has ${expected}`,
      );
    }
  }

  /** Marks a chunk's positions kept; one already marked was kept by an earlier partition. */
  private mark(label: string, c: DecodedChunk): void {
    const seen = this.seen!;
    const { positions } = c;
    for (let i = 0; i < c.count; i++) {
      const pos = positions[i]!;
      const byte = Math.floor(pos / 8);
      const bit = 1 << (pos % 8);
      if ((seen[byte]! & bit) !== 0)
        throw this.error(`${label}: position ${pos} (partition ${c.partition}) is also kept in an earlier partition`);
      seen[byte] = seen[byte]! | bit;
    }
  }

  private error(message: string): FormatError {
    return new FormatError(message, { tensor: this.name });
  }
}
