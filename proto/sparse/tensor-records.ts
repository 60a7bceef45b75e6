/**
 * The record sequence of one tensor: `TensorBegin`, the chunks in partition order, and `TensorEnd` repeating what
 * was sent so a receiver knows the tensor is complete. See docs/design/sparse-chunks.md.
 */
import type { DeltaRecord, TensorBegin, TensorEnd, ValueDtype } from '../gen/dppa/v1/sparse.js';
import { foldChunkCrc } from './chunk-checksum.js';
import { encodeChunks } from './chunk-codec.js';

/** The kept entries of one partition of a tensor. */
export interface PartitionEntries {
  /** Flat row-major positions, strictly increasing integers below 2^53. */
  positions: Float64Array;
  /** One value per position. */
  values: Float32Array;
}

/** Options of {@link tensorRecords}. */
export interface TensorRecordOptions {
  /** Precision of the stored values. @default ValueDtype.VALUE_DTYPE_BF16 */
  valueDtype?: ValueDtype | undefined;
  /** Most entries in one chunk. @default 262144 */
  maxChunkEntries?: number | undefined;
}

/**
 * Number of elements of a tensor of `shape`, as a bound for positions.
 *
 * @returns The product, or `Infinity` when it is not below 2^53 (positions are
 *   limited to 2^53 anyway, so no tighter bound is needed).
 * @throws RangeError if a dimension is negative or not an integer.
 */
export function shapeNumel(shape: readonly (number | bigint)[]): number {
  let n = 1n;
  for (const d of shape) {
    if (typeof d === 'number' && !Number.isSafeInteger(d))
      throw new RangeError(`shape dimension ${d} is not an integer`);
    const b = BigInt(d);
    if (b < 0n) throw new RangeError(`shape dimension ${d} is negative`);
    n *= b;
  }
  return n > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(n);
}

/**
 * Produces the records of one tensor.
 *
 * Lazily, chunk by chunk, so a writer streaming them holds one chunk at a
 * time. A tensor with no kept entry still gets a begin and an end (with
 * `chunk_count` 0), so the receiver learns that nothing was kept.
 *
 * @param name - Tensor name.
 * @param shape - Tensor shape; positions must be below the product.
 * @param partitions - Entries by partition: index p holds partition p (index 0
 *   the outside partition). Its length, P + 1, is the length of
 *   `kept_per_partition`; partitions without entries may hold empty arrays.
 * @param opts - Value precision and chunk size.
 * @returns A generator of `tensorBegin`, `chunk`… and `tensorEnd` records.
 * @throws FormatError (naming the tensor) for invalid positions, as {@link encodeChunks}.
 * @throws RangeError for an invalid shape or option.
 */
export function* tensorRecords(
  name: string,
  shape: readonly (number | bigint)[],
  partitions: readonly PartitionEntries[],
  opts: TensorRecordOptions = {},
): Generator<DeltaRecord, void, undefined> {
  const records = new TensorRecordStream(name, shape, opts);
  yield records.begin();
  for (const [p, entries] of partitions.entries()) yield* records.chunks(p, entries);
  yield records.end(partitions.length);
}

/**
 * The records of one tensor ({@link tensorRecords}) for entries given a piece at a time, so that a writer holds one
 * piece: {@link begin}, the {@link chunks} of each piece (partitions in order; within a partition, each piece's
 * positions after the last piece's), {@link end} (with more partitions than any piece named). A piece starts a new
 * chunk. That order is checked: a piece or an end out of it is a RangeError saying what was expected.
 */
export class TensorRecordStream {
  private readonly numel: number;
  private index = 0;
  private crc = 0;
  /** Entries sent per partition (partition numbers are the caller's: a Map, not an array as long as the highest). */
  private readonly kept = new Map<number, bigint>();
  /** The partition of the last piece, −1 before the first. */
  private lastPartition = -1;
  /** The last position sent in {@link lastPartition}, −1 before its first. */
  private lastPosition = -1;

  /**
   * @param name - Tensor name.
   * @param shape - Tensor shape; positions must be below the product.
   * @param opts - Value precision and chunk size.
   * @throws RangeError for an invalid shape.
   */
  constructor(
    private readonly name: string,
    private readonly shape: readonly (number | bigint)[],
    private readonly opts: TensorRecordOptions = {},
  ) {
    this.numel = shapeNumel(shape);
  }

  /** The `tensorBegin` record. */
  begin(): DeltaRecord {
    const begin: TensorBegin = { name: this.name, shape: this.shape.map((d) => BigInt(d)) };
    return { tensorBegin: begin };
  }

  /**
   * The chunk records of the next piece of partition `partition`'s entries.
   * @throws FormatError (naming the tensor) for invalid positions, as {@link encodeChunks}.
   * @throws RangeError for a partition below the last piece's, a piece whose first position is not above the last
   *   piece's of the same partition, or an invalid partition or option.
   */
  *chunks(partition: number, entries: PartitionEntries): Generator<DeltaRecord, void, undefined> {
    const { positions } = entries;
    if (partition < this.lastPartition)
      throw new RangeError(
        `tensor "${this.name}": a piece of partition ${partition} after partition ${this.lastPartition}, expected partitions in order`,
      );
    const first = positions[0];
    if (partition === this.lastPartition && first !== undefined && first <= this.lastPosition)
      throw new RangeError(
        `tensor "${this.name}": partition ${partition}'s piece starts at position ${first}, expected above ${this.lastPosition} (the last position of its previous piece)`,
      );
    const chunkOpts = {
      valueDtype: this.opts.valueDtype,
      maxChunkEntries: this.opts.maxChunkEntries,
      firstIndex: this.index,
      numel: this.numel === Infinity ? undefined : this.numel,
    };
    for (const chunk of encodeChunks(this.name, partition, positions, entries.values, chunkOpts)) {
      this.crc = foldChunkCrc(this.crc, chunk.crc32c);
      this.index++;
      yield { chunk };
    }
    if (partition !== this.lastPartition) this.lastPosition = -1;
    this.lastPartition = partition;
    if (positions.length > 0) this.lastPosition = positions[positions.length - 1]!;
    this.kept.set(partition, (this.kept.get(partition) ?? 0n) + BigInt(positions.length));
  }

  /**
   * The `tensorEnd` record of a tensor with partitions 0..`partitions` − 1.
   * @throws RangeError when a piece was given for partition `partitions` or above (its entries would go uncounted).
   */
  end(partitions: number): DeltaRecord {
    if (!Number.isSafeInteger(partitions) || partitions <= this.lastPartition)
      throw new RangeError(
        `tensor "${this.name}": ${partitions} partitions, expected an integer above ${this.lastPartition} (the last piece's partition)`,
      );
    const kept = Array.from({ length: partitions }, (_, p) => this.kept.get(p) ?? 0n);
    const end: TensorEnd = { name: this.name, chunkCount: this.index, keptPerPartition: kept, crc32c: this.crc };
    return { tensorEnd: end };
  }
}

/** Which field of a record is set, for messages. */
export function recordKind(record: DeltaRecord): string {
  if (record.header !== undefined) return 'header';
  if (record.tensorBegin !== undefined) return 'tensor begin';
  if (record.chunk !== undefined) return 'chunk';
  if (record.tensorEnd !== undefined) return 'tensor end';
  return 'empty record';
}
