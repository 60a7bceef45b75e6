/**
 * What an upload checks of a tensor's content beyond its record structure: values finite and bounded (deltas, or
 * F − B for fine-tuned weights), precision, partitions, no position kept twice. See docs/design/uploads.md.
 */
import { BaseDeltaError, FormatError } from '../../proto/errors.js';
import { BaseReadError } from '../errors.js';
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
    /** Names the base (its path and fingerprint) for what is remembered of it across uploads. */
    baseKey = '',
  ) {
    // The opened files' identity too: a base rewritten in place (same path and fingerprint) is read afresh.
    this.baseKey = base === undefined ? baseKey : `${baseKey}\0${base.identity}`;
    this.dtype = storageDtype(header.valueDtype);
    this.partitions = header.levels.length;
    this.finetuned = ContentRules.needsBase(header);
    if (this.finetuned && base === undefined) throw new Error('ContentRules: fine-tuned values need the base');
    this.limit = this.dtype === undefined ? 0 : magnitudeLimit(this.dtype, this.finetuned ? Infinity : maxAbsValue);
    this.quarterLimit = this.dtype === undefined ? 0 : magnitudeLimit(this.dtype, maxAbsValue / 4);
  }

  /** What is remembered of the base is keyed by: the caller's name for it and its opened files' identity. */
  readonly baseKey: string;

  /** Magnitude bits of a quarter of the bound in the values' dtype: |F| and |B| both within it bound |F − B|. */
  readonly quarterLimit: number;

  /**
   * Whether every weight of a base tensor has magnitude at most a quarter of the bound (read a window at a time,
   * remembered per base and tensor). Then a fine-tuned weight within a quarter too has |F − B| ≤ half the bound,
   * fp32 rounding included, with no need to form it.
   */
  baseWithinQuarter(tensor: string, baseKey: string): Promise<boolean> {
    const key = `${baseKey}\0${tensor}\0${this.maxAbsValue}`;
    let known = BASE_QUARTER.get(key);
    if (known === undefined) {
      known = scanBase(this.base!, tensor, this.maxAbsValue / 4);
      if (BASE_QUARTER.size >= BASE_QUARTER_ENTRIES) BASE_QUARTER.delete(BASE_QUARTER.keys().next().value!);
      BASE_QUARTER.set(key, known);
      known.catch(() => BASE_QUARTER.delete(key));
    }
    return known;
  }

  /** Whether an upload with this header is checked against the base (it carries values, and they are fine-tuned weights). */
  static needsBase(header: DeltaHeader): boolean {
    return carriesFinetuned(header) && storageDtype(header.valueDtype) !== undefined;
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
    return new TensorCheck(plan.name, linear, this, this.limit, seen, this.baseKey);
  }
}

/** Base tensors known to be within a quarter of a bound, by base, tensor and bound (oldest dropped first). */
const BASE_QUARTER = new Map<string, Promise<boolean>>();
const BASE_QUARTER_ENTRIES = 4096;

/** Bytes of a base tensor scanned at a time. */
const SCAN_BYTES = 4 * 1024 * 1024;

/** Whether every weight of a base tensor has magnitude at most `bound` (on the stored bits). */
async function scanBase(base: Checkpoint, tensor: string, bound: number): Promise<boolean> {
  const { dtype, byteLength } = base.info(tensor);
  const limit = magnitudeLimit(dtype, bound);
  const into = new Uint8Array(Math.min(SCAN_BYTES, byteLength));
  for (let at = 0; at < byteLength; at += into.byteLength) {
    const bytes = await base.readRawRange(tensor, at, Math.min(into.byteLength, byteLength - at), { into });
    if (firstValueBeyond(bytes, dtype, limit) >= 0) return false;
  }
  return true;
}

/** The content checks of one tensor; errors name the tensor and chunk. */
export class TensorCheck {
  constructor(
    private readonly name: string,
    private readonly linear: boolean,
    private readonly rules: ContentRules,
    private readonly limit: number,
    private readonly seen: Uint8Array | undefined,
    /** Names the base in {@link ContentRules.baseWithinQuarter}'s memory. */
    private readonly baseKey = '',
  ) {}

  /** Forms F − B for the exact check; made the first time the shortcut does not apply (most tensors never need it). */
  private toDelta: FinetunedToDelta | undefined;

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
    const finetuned = this.rules.finetuned && dtype !== undefined;
    // Fine-tuned weights: one scan of F for the usual case, every |F| within a quarter of the bound (hence finite).
    const withinQuarter = finetuned && firstValueBeyond(raw.values, dtype, this.rules.quarterLimit) < 0;
    const bad = dtype === undefined || withinQuarter ? -1 : firstValueBeyond(raw.values, dtype, this.limit);
    if (bad >= 0 && dtype !== undefined) {
      const size = dtype === 'F32' ? 4 : 2;
      const value = decodeToF32(raw.values.subarray(bad * size, (bad + 1) * size), dtype)[0]!;
      const bound = finetuned ? '' : ` with magnitude at most ${this.rules.maxAbsValue} (the job's max_abs_value)`;
      throw this.error(
        `${label}: the value at position ${decoded.positions[bad]} is ${value}; values must be finite${bound}`,
      );
    }
    if (finetuned) await this.checkDeltas(label, raw, decoded, dtype, withinQuarter);
    if (this.seen !== undefined) this.mark(label, decoded);
  }

  /** Bounds the deltas F − B of a chunk of fine-tuned weights (formed in fp32 as the merge forms them). */
  private async checkDeltas(
    label: string,
    raw: SparseChunk,
    decoded: DecodedChunk,
    dtype: Dtype,
    withinQuarter: boolean,
  ): Promise<void> {
    // Most chunks: |F| and every |B| of the tensor within a quarter of the bound, so |F − B| is within half of it.
    // A scan that failed (another upload's base closed under it) only means the exact check below.
    if (withinQuarter && (await this.rules.baseWithinQuarter(this.name, this.baseKey).catch(() => false))) return;
    const n = decoded.count;
    const rules = this.rules;
    if (rules.values.length < n) rules.values = new Float32Array(n);
    const values = decodeToF32(raw.values, dtype, rules.values.subarray(0, n));
    this.toDelta ??= new FinetunedToDelta(rules.base!, this.name);
    try {
      await this.toDelta.convert({ ...decoded, values });
    } catch (err) {
      // F − B not finite: the base is at fault (a non-finite weight, or one beyond fp32 from F), not the party;
      // the merge fails the job naming it (failure-policy.ts), so the chunk is taken as it is, and the rest of it
      // goes unchecked on purpose: the job cannot merge anyway.
      if (err instanceof BaseDeltaError) return;
      // The base could not be read (truncated or damaged on the server since the job began): not the party's fault.
      throw BaseReadError.of(this.name, err);
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
