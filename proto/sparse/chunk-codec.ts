/**
 * Encoding and decoding of sparse chunks: the kept entries of one tensor and partition, in pieces each checksummed
 * and decodable alone, allocating only for kept entries. See docs/design/sparse-chunks.md.
 */
import { PositionCoding, ValueDtype, type SparseChunk } from '../gen/dppa/v1/sparse.js';
import { ChecksumError, FormatError, TruncatedError } from '../errors.js';
import { chunkChecksum } from './chunk-checksum.js';
import { decodeGaps, encodeGaps, golombParameter, MAX_GOLOMB_M, minGapBits } from './golomb.js';
import { DEFAULT_VALUE_DTYPE, decodeValues, encodeValues, storageDtype, valueSize } from './value-dtype.js';

/** Entries per chunk when not given: about 0.5 MiB of BF16 values plus their positions. */
export const DEFAULT_MAX_CHUNK_ENTRIES = 262144;

/** Options of {@link encodeChunks}. */
export interface EncodeChunksOptions {
  /** Precision of the stored values. @default ValueDtype.VALUE_DTYPE_BF16 */
  valueDtype?: ValueDtype | undefined;
  /** Most entries in one chunk. @default {@link DEFAULT_MAX_CHUNK_ENTRIES} */
  maxChunkEntries?: number | undefined;
  /** `index` of the first chunk produced (chunk indices run across a tensor's partitions). @default 0 */
  firstIndex?: number | undefined;
  /** Number of elements of the tensor; when given, every position must be below it. @default no check */
  numel?: number | undefined;
}

/**
 * Splits the kept entries of one partition of a tensor into chunks.
 *
 * A chunk whose positions form one contiguous run is stored as a range
 * (no position bytes); any other is Golomb-coded with a parameter fitted to
 * the chunk's own density. Chunks are produced lazily so that a caller
 * streaming them out holds one at a time.
 *
 * @param tensor - Tensor name.
 * @param partition - Partition of every entry (0 outside, 1..P inside linear layers).
 * @param positions - Flat row-major positions: integers, strictly increasing, below 2^53.
 * @param values - One value per position.
 * @param opts - See {@link EncodeChunksOptions}.
 * @returns A generator of chunks with indices `firstIndex`, `firstIndex + 1`, …; none when there is no entry.
 * @throws FormatError (naming the tensor) when positions and values differ in length, or a position
 *   is not an integer, not increasing, not below 2^53 or not below `numel`. Thrown by the
 *   generator's first step, before any chunk.
 * @throws RangeError for an invalid partition, value dtype, chunk size or first index
 *   (also from the first step).
 */
export function* encodeChunks(
  tensor: string,
  partition: number,
  positions: Float64Array,
  values: Float32Array,
  opts: EncodeChunksOptions = {},
): Generator<SparseChunk, void, undefined> {
  // UNSPECIFIED means the default; chunks always say which precision they carry.
  const valueDtype =
    opts.valueDtype === undefined || opts.valueDtype === ValueDtype.VALUE_DTYPE_UNSPECIFIED
      ? DEFAULT_VALUE_DTYPE
      : opts.valueDtype;
  const maxEntries = opts.maxChunkEntries ?? DEFAULT_MAX_CHUNK_ENTRIES;
  const firstIndex = opts.firstIndex ?? 0;
  // Positions only (a secure job's support): `values` may be empty, and no value bytes are written.
  const positionsOnly = valueDtype === ValueDtype.VALUE_DTYPE_NONE;
  const dtype = storageDtype(valueDtype);
  if (dtype === undefined && !positionsOnly)
    throw new RangeError(`tensor "${tensor}": value dtype ${valueDtype} is not BF16, F16, F32 or NONE`);
  checkUint32('partition', partition, tensor);
  checkUint32('firstIndex', firstIndex, tensor);
  if (!Number.isInteger(maxEntries) || maxEntries < 1 || maxEntries > 0xffffffff) {
    throw new RangeError(`tensor "${tensor}": maxChunkEntries must be a positive 32-bit integer, got ${maxEntries}`);
  }
  checkPositions(
    tensor,
    positions,
    positionsOnly && values.length === 0 ? positions.length : values.length,
    opts.numel,
  );

  const n = positions.length;
  if (firstIndex + Math.ceil(n / maxEntries) - 1 > 0xffffffff) {
    throw new RangeError(`tensor "${tensor}": chunk indices would exceed 2^32 − 1`);
  }
  for (let start = 0, index = firstIndex; start < n; start += maxEntries, index++) {
    const end = Math.min(start + maxEntries, n);
    const count = end - start;
    const first = positions[start]!;
    const span = positions[end - 1]! - first + 1;
    const isRun = span === count;
    const golombM = isRun ? 0 : golombParameter(count, span);
    const chunk: SparseChunk = {
      tensor,
      partition,
      index,
      firstPosition: BigInt(first),
      count,
      positionCoding: isRun ? PositionCoding.POSITION_CODING_RANGE : PositionCoding.POSITION_CODING_GOLOMB,
      golombM,
      positions: isRun ? Buffer.alloc(0) : asBuffer(encodeGaps(positions, start, end, golombM)),
      valueDtype,
      values: dtype === undefined ? Buffer.alloc(0) : encodeValues(values.subarray(start, end), dtype),
      crc32c: 0,
    };
    chunk.crc32c = chunkChecksum(chunk);
    yield chunk;
  }
}

function checkUint32(what: string, v: number, tensor: string): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`tensor "${tensor}": ${what} must be an unsigned 32-bit integer, got ${v}`);
  }
}

/** One pass over all positions, so the coders can assume valid input and stay branch-light. */
function checkPositions(tensor: string, positions: Float64Array, valueCount: number, numel: number | undefined): void {
  const n = positions.length;
  if (n !== valueCount) {
    throw new FormatError(`${n} positions but ${valueCount} values`, { tensor });
  }
  if (n === 0) return;
  const first = positions[0]!;
  if (!(first >= 0) || !Number.isInteger(first)) {
    throw new FormatError(`position 0 is ${first}, not a non-negative integer`, { tensor });
  }
  let prev = first;
  for (let i = 1; i < n; i++) {
    const cur = positions[i]!;
    const d = cur - prev;
    // Differences of integers below 2^53 are exact, so integrality of every
    // difference and of the first position makes every position an integer.
    if (!(d >= 1) || d !== Math.floor(d)) {
      throw new FormatError(`positions must be strictly increasing integers: entry ${i} is ${cur} after ${prev}`, {
        tensor,
      });
    }
    prev = cur;
  }
  if (prev > Number.MAX_SAFE_INTEGER) {
    throw new FormatError(`position ${prev} is not below 2^53`, { tensor });
  }
  if (numel !== undefined && prev >= numel) {
    throw new FormatError(`position ${prev} is outside the tensor (${numel} elements)`, { tensor });
  }
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Where a chunk being decoded comes from, for error messages and bounds. */
export interface DecodeChunkContext {
  /** File the chunk was read from, named in errors. @default none */
  file?: string | undefined;
  /** Number of elements of the tensor; every position must be below it. @default no check */
  numel?: number | undefined;
  /**
   * Leave the values undecoded ({@link decodeChunk} then returns an empty `values`): for a caller that
   * reads them on their stored bits, as the upload's checks do. @default false
   */
  skipValues?: boolean | undefined;
}

/** What {@link checkChunk} establishes about a chunk without decoding its positions. */
export interface CheckedChunk {
  /** Tensor name from the chunk. */
  tensor: string;
  /** Chunk index within its tensor. */
  index: number;
  /** Partition of every entry. */
  partition: number;
  /** Number of entries. */
  count: number;
  /** First position. */
  firstPosition: number;
  /**
   * Smallest possible last position, `firstPosition + count − 1`: exact for a
   * RANGE chunk, a lower bound for a Golomb-coded one until it is decoded.
   */
  lastPositionAtLeast: number;
  /** Whether the positions are `firstPosition … firstPosition + count − 1` (a RANGE chunk; `lastPositionAtLeast` is then exact). */
  range: boolean;
}

/** The entries of one chunk. */
export interface DecodedChunk extends CheckedChunk {
  /** Flat positions, strictly increasing. */
  positions: Float64Array;
  /** Values widened to F32 (exact for every stored precision). */
  values: Float32Array;
}

/** Reusable arrays for {@link decodeChunk}; grown as needed. */
export interface DecodeScratch {
  positions: Float64Array;
  values: Float32Array;
}

/**
 * Checks a chunk without decoding its positions: the checksum first (so
 * damaged bytes surface as a ChecksumError rather than as a misleading format
 * error), then the count, the value bytes, the coding and its parameter, the
 * length of the position bit stream against the fewest bits `count − 1` gaps
 * take, and the first (and least possible last) position against 2^53 and
 * `numel`. What remains unchecked until {@link decodeChunk} is that the bit
 * stream holds exactly `count − 1` gaps and that the last position is in range.
 *
 * Costs a CRC-32C pass over the chunk's bytes and nothing per entry.
 *
 * @param chunk - The chunk as received.
 * @param ctx - File name for errors and the tensor's element count for bounds.
 * @throws ChecksumError when the chunk's CRC-32C does not match its content.
 * @throws TruncatedError when the position bit stream is shorter than `count − 1` gaps can be.
 * @throws FormatError when `count` is 0, the value bytes are not `count` values of the
 *   chunk's dtype, the coding or Golomb parameter is invalid, or a position is at or
 *   beyond 2^53 or `numel`. Every error names the tensor, the chunk index and, if given, the file.
 */
export function checkChunk(chunk: SparseChunk, ctx: DecodeChunkContext = {}): CheckedChunk {
  const where = { file: ctx.file, tensor: chunk.tensor };
  const label = `chunk ${chunk.index}`;
  const crc = chunkChecksum(chunk);
  if (crc !== chunk.crc32c) {
    throw new ChecksumError(`${label}: CRC-32C mismatch (stored ${hex(chunk.crc32c)}, computed ${hex(crc)})`, where);
  }
  const count = chunk.count;
  if (count < 1) throw new FormatError(`${label}: count is 0`, where);
  const dtype = storageDtype(chunk.valueDtype);
  const positionsOnly = chunk.valueDtype === ValueDtype.VALUE_DTYPE_NONE;
  if (dtype === undefined && !positionsOnly)
    throw new FormatError(`${label}: unknown value dtype ${chunk.valueDtype}`, where);
  const expectedBytes = dtype === undefined ? 0 : count * valueSize(dtype);
  // Checked before anything allocates `count` entries, so a forged count cannot allocate more than the chunk carries.
  if (chunk.values.length !== expectedBytes) {
    throw new FormatError(
      `${label}: ${chunk.values.length} value bytes, expected ${expectedBytes} (${count} × ${dtype ?? 'NONE'})`,
      where,
    );
  }
  checkCoding(chunk, label, where);
  const first = Number(chunk.firstPosition);
  const lastAtLeast = first + count - 1;
  if (chunk.firstPosition > BigInt(Number.MAX_SAFE_INTEGER) || lastAtLeast > Number.MAX_SAFE_INTEGER) {
    throw new FormatError(
      `${label}: positions from ${chunk.firstPosition} (${count} entries) are not below 2^53`,
      where,
    );
  }
  if (ctx.numel !== undefined && lastAtLeast >= ctx.numel) {
    throw new FormatError(`${label}: position ${lastAtLeast} is outside the tensor (${ctx.numel} elements)`, where);
  }
  const range = chunk.positionCoding === PositionCoding.POSITION_CODING_RANGE;
  return {
    tensor: chunk.tensor,
    index: chunk.index,
    partition: chunk.partition,
    count,
    firstPosition: first,
    lastPositionAtLeast: lastAtLeast,
    range,
  };
}

function checkCoding(chunk: SparseChunk, label: string, where: { file: string | undefined; tensor: string }): void {
  switch (chunk.positionCoding) {
    case PositionCoding.POSITION_CODING_RANGE:
      if (chunk.positions.length !== 0 || chunk.golombM !== 0) {
        throw new FormatError(`${label}: a RANGE chunk must have no position bytes and golomb_m 0`, where);
      }
      return;
    case PositionCoding.POSITION_CODING_GOLOMB: {
      const m = chunk.golombM;
      if (m < 1 || m > MAX_GOLOMB_M) {
        throw new FormatError(`${label}: golomb_m ${m} is outside 1..2^31`, where);
      }
      const leastBytes = Math.ceil(((chunk.count - 1) * minGapBits(m)) / 8);
      if (chunk.positions.length < leastBytes) {
        throw new TruncatedError(
          `${label}: position bit stream (${chunk.positions.length} bytes) is too short for ${chunk.count - 1} gaps (at least ${leastBytes} bytes)`,
          where,
        );
      }
      return;
    }
    default:
      throw new FormatError(`${label}: unknown position coding ${chunk.positionCoding}`, where);
  }
}

/**
 * Verifies and decodes one chunk: {@link checkChunk}, then every position.
 *
 * @param chunk - The chunk as received.
 * @param ctx - File name for errors and the tensor's element count for bounds.
 * @param scratch - Arrays to decode into, grown when too small; the result's arrays are
 *   then views of them, valid until their next use. The positions of a RANGE chunk are then
 *   written only if read (they are implied by `firstPosition` and `count`, and filling them
 *   cost as much as adding the entries): a consumer can use {@link addChunkScaled}, or
 *   `range` and `firstPosition`, without ever touching them. @default new arrays (never views of the chunk)
 * @returns Positions and values.
 * @throws As {@link checkChunk}; TruncatedError when the position bit stream ends before
 *   `count − 1` gaps; FormatError when it has data after the last gap, or the last position
 *   is at or beyond 2^53 or `numel`.
 */
export function decodeChunk(chunk: SparseChunk, ctx: DecodeChunkContext = {}, scratch?: DecodeScratch): DecodedChunk {
  const checked = checkChunk(chunk, ctx);
  const where = { file: ctx.file, tensor: chunk.tensor };
  const label = `chunk ${chunk.index}`;
  const { count } = checked;
  const skip = ctx.skipValues === true;
  if (scratch !== undefined && !skip && scratch.values.length < count) scratch.values = new Float32Array(count);
  const values = skip ? NO_VALUES : scratch === undefined ? new Float32Array(count) : scratch.values.subarray(0, count);
  // A positions-only chunk decodes with every value 0.
  const dtype = storageDtype(chunk.valueDtype);
  if (!skip) {
    if (dtype === undefined) values.fill(0);
    else decodeValues(chunk.values, dtype, values);
  }
  if (checked.range && scratch !== undefined) {
    // checkChunk has bounded the last position already. The scratch grows for them only when they are read: a RANGE
    // chunk may span a whole tensor in a few bytes.
    const { firstPosition } = checked;
    let filled: Float64Array | undefined;
    return {
      ...checked,
      values,
      get positions(): Float64Array {
        filled ??= fillRange(scratchPositions(scratch, count), firstPosition);
        return filled;
      },
    };
  }
  const positions = scratch === undefined ? new Float64Array(count) : scratchPositions(scratch, count);
  decodePositions(chunk, checked.firstPosition, positions, label, where);
  const last = positions[count - 1]!;
  if (last > Number.MAX_SAFE_INTEGER) {
    throw new FormatError(`${label}: position ${last} is not below 2^53`, where);
  }
  if (ctx.numel !== undefined && last >= ctx.numel) {
    throw new FormatError(`${label}: position ${last} is outside the tensor (${ctx.numel} elements)`, where);
  }
  return { ...checked, positions, values };
}

const NO_VALUES = new Float32Array(0);

/** The first `count` entries of the scratch's positions, grown to hold them. */
function scratchPositions(scratch: DecodeScratch, count: number): Float64Array {
  if (scratch.positions.length < count) scratch.positions = new Float64Array(count);
  return scratch.positions.subarray(0, count);
}

/** Decodes the positions of a chunk {@link checkChunk} accepted into `out` (exactly `count` long). */
function decodePositions(
  chunk: SparseChunk,
  first: number,
  out: Float64Array,
  label: string,
  where: { file: string | undefined; tensor: string },
): void {
  if (chunk.positionCoding === PositionCoding.POSITION_CODING_RANGE) {
    fillRange(out, first);
    return;
  }
  out[0] = first;
  const status = decodeGaps(chunk.positions, chunk.golombM, out);
  if (status === 'truncated') {
    throw new TruncatedError(
      `${label}: position bit stream (${chunk.positions.length} bytes) ends before ${chunk.count - 1} gaps`,
      where,
    );
  }
  if (status === 'trailing-data') {
    throw new FormatError(`${label}: position bit stream has data after its ${chunk.count - 1} gaps`, where);
  }
}

function fillRange(out: Float64Array, first: number): Float64Array {
  for (let i = 0; i < out.length; i++) out[i] = first + i;
  return out;
}

function hex(v: number): string {
  return `0x${v.toString(16).padStart(8, '0')}`;
}
