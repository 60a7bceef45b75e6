/**
 * The receiving side of a tensor's records: checks their order and consistency and decodes the chunks, so that a
 * tensor is accepted only once all of it has arrived intact. See docs/design/sparse-chunks.md.
 */
import type { DeltaRecord, SparseChunk, TensorBegin, TensorEnd } from '../gen/dppa/v1/sparse.js';
import { FormatError } from '../errors.js';
import { foldChunkCrc } from './chunk-checksum.js';
import { decodeChunk, type DecodedChunk, type DecodeScratch } from './chunk-codec.js';
import { recordKind, shapeNumel, type PartitionEntries } from './tensor-records.js';

/** A tensor whose records were all received and checked. */
export interface AssembledTensor {
  /** Tensor name. */
  name: string;
  /** Shape from the begin record. */
  shape: bigint[];
  /** Number of chunks received. */
  chunkCount: number;
  /** Entries per partition, index p for partition p; length P + 1 as in the end record. */
  keptPerPartition: number[];
  /**
   * Entries by partition, index p for partition p, positions ascending.
   * Empty arrays unless the assembler was created with `entries: 'collect'`.
   */
  partitions: PartitionEntries[];
}

/** Options of {@link TensorAssembler}. */
export interface TensorAssemblerOptions {
  /** File the records come from, named in errors. @default none */
  file?: string | undefined;
  /**
   * What becomes of the chunks' entries:
   * - `collect`: decoded and kept, for {@link TensorAssembler.result};
   * - `stream`: decoded and returned by {@link TensorAssembler.push} in arrays the
   *   assembler reuses (valid until the next push), for a caller that consumes them at once.
   * @default 'collect'
   */
  entries?: 'collect' | 'stream' | undefined;
  /** Highest partition a chunk may have. @default no limit */
  maxPartition?: number | undefined;
  /**
   * Widen each chunk's values to f32. False leaves them as received (the pushed chunk's `values` is
   * then empty), for a caller that checks them on their stored bits; with `entries: 'stream'`. @default true
   */
  values?: boolean | undefined;
}

/**
 * Checks and decodes the records of one tensor, in the order they arrive.
 *
 * Enforces: a begin first; chunks with indices 0, 1, 2, … naming the same
 * tensor, partitions non-decreasing (and at most `maxPartition`) and positions
 * ascending within a partition, each chunk valid on its own
 * ({@link decodeChunk}); an end whose name, chunk count, entries per partition
 * and CRC match what was received. Nothing may follow the end.
 */
export class TensorAssembler {
  private readonly file: string | undefined;
  private readonly entries: 'collect' | 'stream';
  private readonly maxPartition: number;
  private readonly skipValues: boolean;
  private readonly scratch: DecodeScratch | undefined;
  private begin: TensorBegin | undefined;
  private numel = Infinity;
  private nextIndex = 0;
  private crc = 0;
  private lastPartition = -1;
  private lastPosition = -1;
  /** Entries received per partition; a Map because partition numbers come from the wire. */
  private readonly counts = new Map<number, number>();
  private readonly received = new Map<number, DecodedChunk[]>();
  private assembled: AssembledTensor | undefined;

  /** @param opts - File name for errors, what to do with entries, partition limit. */
  constructor(opts: TensorAssemblerOptions = {}) {
    this.file = opts.file;
    this.entries = opts.entries ?? 'collect';
    this.maxPartition = opts.maxPartition ?? Infinity;
    this.skipValues = opts.values === false;
    this.scratch =
      this.entries === 'stream' ? { positions: new Float64Array(0), values: new Float32Array(0) } : undefined;
  }

  /** Name from the begin record, once it arrived. */
  get name(): string | undefined {
    return this.begin?.name;
  }

  /** True once the end record arrived and matched. */
  get complete(): boolean {
    return this.assembled !== undefined;
  }

  /**
   * Takes the next record of the tensor.
   *
   * @param record - A `tensorBegin`, `chunk` or `tensorEnd` record.
   * @returns The decoded entries for a chunk record; undefined for begin and end.
   * @throws FormatError (naming the tensor and file) when the record is out of place or does
   *   not match; ChecksumError / TruncatedError / FormatError from {@link decodeChunk}.
   */
  push(record: DeltaRecord): DecodedChunk | undefined {
    if (this.assembled !== undefined) {
      throw this.error(`record after the tensor's end`);
    }
    if (record.tensorBegin !== undefined) {
      if (this.begin !== undefined) throw this.error(`second tensor begin ("${record.tensorBegin.name}")`);
      this.begin = record.tensorBegin;
      this.numel = shapeNumelOrThrow(record.tensorBegin, this.file);
      return undefined;
    }
    if (this.begin === undefined) {
      throw new FormatError(`expected a tensor begin, got ${recordKind(record)}`, {
        file: this.file,
        tensor: record.chunk?.tensor ?? record.tensorEnd?.name,
      });
    }
    if (record.chunk !== undefined) return this.takeChunk(record.chunk);
    if (record.tensorEnd !== undefined) {
      this.takeEnd(record.tensorEnd);
      return undefined;
    }
    throw this.error(`unexpected ${recordKind(record)} inside the tensor's records`);
  }

  /**
   * The tensor, once its end record arrived.
   *
   * @throws FormatError if the end has not arrived yet.
   */
  result(): AssembledTensor {
    if (this.assembled === undefined) throw this.error('tensor end not received yet');
    return this.assembled;
  }

  private takeChunk(chunk: SparseChunk): DecodedChunk {
    const name = this.begin!.name;
    if (chunk.tensor !== name) {
      throw this.error(`chunk ${chunk.index} names tensor "${chunk.tensor}"`);
    }
    if (chunk.index !== this.nextIndex) {
      throw this.error(`chunk ${chunk.index} out of order: expected chunk ${this.nextIndex}`);
    }
    const ctx = { file: this.file, numel: this.numel, skipValues: this.skipValues };
    const c = decodeChunk(chunk, ctx, this.scratch);
    if (c.partition > this.maxPartition) {
      throw this.error(
        `chunk ${chunk.index} is in partition ${c.partition}, but there are ${this.maxPartition} partition(s)`,
      );
    }
    if (c.partition < this.lastPartition) {
      throw this.error(`chunk ${chunk.index} is in partition ${c.partition} after partition ${this.lastPartition}`);
    }
    if (c.partition === this.lastPartition && c.firstPosition <= this.lastPosition) {
      throw this.error(
        `chunk ${chunk.index} starts at position ${c.firstPosition}, not after ${this.lastPosition} where the previous chunk of partition ${c.partition} ended`,
      );
    }
    this.lastPartition = c.partition;
    // A RANGE chunk's end is exact without its positions, which the assembler may leave unwritten.
    this.lastPosition = c.range ? c.lastPositionAtLeast : c.positions[c.count - 1]!;
    this.crc = foldChunkCrc(this.crc, chunk.crc32c);
    this.nextIndex++;
    this.counts.set(c.partition, (this.counts.get(c.partition) ?? 0) + c.count);
    if (this.entries === 'collect') {
      const list = this.received.get(c.partition);
      if (list === undefined) this.received.set(c.partition, [c]);
      else list.push(c);
    }
    return c;
  }

  private takeEnd(end: TensorEnd): void {
    const name = this.begin!.name;
    if (end.name !== name) throw this.error(`tensor end names tensor "${end.name}"`);
    if (end.chunkCount !== this.nextIndex) {
      throw this.error(`tensor end says ${end.chunkCount} chunks, ${this.nextIndex} received`);
    }
    const parts = end.keptPerPartition.length;
    // Chunks arrive in non-decreasing partition order, so the last one has the highest partition.
    if (this.lastPartition >= parts) {
      throw this.error(`chunks of partition ${this.lastPartition} received, tensor end lists ${parts} partitions`);
    }
    const kept: number[] = [];
    for (let p = 0; p < parts; p++) {
      const got = this.counts.get(p) ?? 0;
      if (end.keptPerPartition[p] !== BigInt(got)) {
        throw this.error(`tensor end says ${end.keptPerPartition[p]} entries in partition ${p}, ${got} received`);
      }
      kept.push(got);
    }
    if (end.crc32c !== this.crc) {
      throw this.error(
        `tensor end CRC-32C 0x${end.crc32c.toString(16)} does not match the chunks received (0x${this.crc.toString(16)})`,
      );
    }
    const partitions: PartitionEntries[] = [];
    for (let p = 0; p < parts; p++)
      partitions.push(concat(this.received.get(p) ?? [], this.entries === 'collect' ? kept[p]! : 0));
    this.received.clear();
    this.assembled = { name, shape: this.begin!.shape, chunkCount: this.nextIndex, keptPerPartition: kept, partitions };
  }

  private error(message: string): FormatError {
    return new FormatError(message, { file: this.file, tensor: this.begin?.name });
  }
}

function shapeNumelOrThrow(begin: TensorBegin, file: string | undefined): number {
  try {
    return shapeNumel(begin.shape);
  } catch (cause) {
    throw new FormatError(`bad shape [${begin.shape.join(', ')}]`, { file, tensor: begin.name, cause });
  }
}

function concat(chunks: readonly DecodedChunk[], total: number): PartitionEntries {
  if (chunks.length === 1) return { positions: chunks[0]!.positions, values: chunks[0]!.values };
  const positions = new Float64Array(total);
  const values = new Float32Array(total);
  let at = 0;
  for (const c of chunks) {
    positions.set(c.positions, at);
    values.set(c.values, at);
    at += c.positions.length;
  }
  return { positions, values };
}

/**
 * Checks and decodes the complete record sequence of one tensor.
 *
 * @param records - Begin, chunks and end of one tensor.
 * @param opts - File name for errors.
 * @returns The tensor with its entries by partition.
 * @throws FormatError / ChecksumError / TruncatedError as {@link TensorAssembler.push};
 *   FormatError when the records end before the tensor's end record.
 */
export function assembleTensor(
  records: Iterable<DeltaRecord>,
  opts: { file?: string | undefined } = {},
): AssembledTensor {
  const assembler = new TensorAssembler(opts);
  for (const record of records) assembler.push(record);
  return assembler.result();
}
