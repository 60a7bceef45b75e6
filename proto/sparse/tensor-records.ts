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
  const numel = shapeNumel(shape);
  const begin: TensorBegin = { name, shape: shape.map((d) => BigInt(d)) };
  yield { tensorBegin: begin };
  let index = 0;
  let crc = 0;
  const kept: bigint[] = [];
  for (const [p, entries] of partitions.entries()) {
    const chunkOpts = {
      valueDtype: opts.valueDtype,
      maxChunkEntries: opts.maxChunkEntries,
      firstIndex: index,
      numel: numel === Infinity ? undefined : numel,
    };
    for (const chunk of encodeChunks(name, p, entries.positions, entries.values, chunkOpts)) {
      crc = foldChunkCrc(crc, chunk.crc32c);
      index++;
      yield { chunk };
    }
    kept.push(BigInt(entries.positions.length));
  }
  const end: TensorEnd = { name, chunkCount: index, keptPerPartition: kept, crc32c: crc };
  yield { tensorEnd: end };
}

/** Which field of a record is set, for messages. */
export function recordKind(record: DeltaRecord): string {
  if (record.header !== undefined) return 'header';
  if (record.tensorBegin !== undefined) return 'tensor begin';
  if (record.chunk !== undefined) return 'chunk';
  if (record.tensorEnd !== undefined) return 'tensor end';
  return 'empty record';
}
