/**
 * The merged patch's records: for one tensor, the positions the merge changed
 * (the union of the parties' supports) with the merged values in the base's
 * dtype, as `.dppa` chunks (docs/formats.md, "Merged patch"). The server's
 * merge kernel produces them next to the dense tensor, from the same fp32
 * accumulator and the same rounding, so that a patch applied to the base
 * gives the dense merge bit for bit.
 */
import { OutsidePolicy, PruneMethod } from '../gen/dppa/v1/algorithm.js';
import {
  DeltaRecord,
  PositionCoding,
  ValueDtype,
  ValueKind,
  type DeltaHeader,
  type SparseChunk,
  type TensorPlan,
} from '../gen/dppa/v1/sparse.js';
import { FormatError } from '../errors.js';
import type { Dtype } from '../safetensors/dtype.js';
import {
  chunkChecksum,
  DEFAULT_MAX_CHUNK_ENTRIES,
  encodeChunks,
  foldChunkCrc,
  type DecodedChunk,
} from '../sparse/index.js';
import { encodeValues } from '../sparse/value-dtype.js';
import { DELTA_FORMAT_VERSION, RECORD_LENGTH_BYTES } from '../sparse/delta-format.js';

/** Name of the patch file the server writes and lists. */
export const PATCH_FILE_NAME = 'merged-patch.dppa';

/** The chunk precision that carries values of a base dtype unchanged. */
export function patchValueDtype(dtype: Dtype): ValueDtype {
  return dtype === 'BF16'
    ? ValueDtype.VALUE_DTYPE_BF16
    : dtype === 'F16'
      ? ValueDtype.VALUE_DTYPE_F16
      : ValueDtype.VALUE_DTYPE_F32;
}

/** The header of a merged patch: the base it applies to and the tensors it changes, in the order their records follow. */
export function patchHeader(
  baseFingerprint: string,
  tensors: readonly { name: string; shape: readonly (number | bigint)[]; baseSha256: Uint8Array }[],
  producer = 'dppa-federated',
): DeltaHeader {
  const plans: TensorPlan[] = tensors.map((t) => ({
    name: t.name,
    shape: t.shape.map((d) => BigInt(d)),
    kind: 0,
    layer: -1,
    levelRates: [],
    sent: true,
    baseSha256: t.baseSha256,
  }));
  return {
    formatVersion: DELTA_FORMAT_VERSION,
    baseFingerprint,
    method: '',
    rate: 0,
    levels: [],
    options: {},
    valueDtype: ValueDtype.VALUE_DTYPE_UNSPECIFIED,
    tensors: plans,
    producer,
    pruneMethod: PruneMethod.PRUNE_METHOD_UNSPECIFIED,
    outside: OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED,
    valueKind: ValueKind.VALUE_KIND_MERGED,
  };
}

/**
 * Refuses a tensor a merged patch cannot hold (positions are indexed as 32-bit).
 * @throws FormatError naming the tensor for 2^32 elements or more.
 */
export function checkPatchNumel(numel: number, tensor: string): void {
  if (numel >= 2 ** 32)
    throw new FormatError(`a merged patch handles tensors below 2^32 elements, not ${numel}`, { tensor });
}

/**
 * The positions of a tensor that some party's entries reached: a bit per
 * element, set as the merge adds each chunk.
 */
export class PatchSupport {
  readonly bits: Uint8Array;

  /** @throws FormatError naming the tensor for 2^32 elements or more ({@link checkPatchNumel}). */
  constructor(
    readonly numel: number,
    tensor = '',
  ) {
    checkPatchNumel(numel, tensor);
    this.bits = new Uint8Array(Math.ceil(numel / 8));
  }

  /** Whether every position is marked. */
  whole(): boolean {
    const bits = this.bits;
    const full = this.numel >>> 3;
    for (let i = 0; i < full; i++) if (bits[i] !== 0xff) return false;
    const rest = this.numel & 7;
    return rest === 0 || bits[full] === (1 << rest) - 1;
  }

  /** Marks the positions of a decoded chunk. */
  add(chunk: DecodedChunk): void {
    const bits = this.bits;
    if (chunk.range) {
      // count, not values.length: a decoder's scratch array may be longer than the chunk.
      const end = chunk.firstPosition + chunk.count;
      let p = chunk.firstPosition;
      for (; p < end && (p & 7) !== 0; p++) bits[p >>> 3]! |= 1 << (p & 7);
      for (; p + 8 <= end; p += 8) bits[p >>> 3] = 0xff;
      for (; p < end; p++) bits[p >>> 3]! |= 1 << (p & 7);
      return;
    }
    const pos = chunk.positions;
    for (let i = 0; i < pos.length; i++) {
      const p = pos[i]!;
      bits[p >>> 3]! |= 1 << (p & 7);
    }
  }
}

/**
 * The framed records (each a 4-byte little-endian length and a DeltaRecord,
 * as in a `.dppa` file) of one tensor of a merged patch: a begin, chunks of at
 * most `maxChunkEntries` marked positions with their values from `acc`
 * rounded to `dtype` exactly as the dense tensor is, and an end. A tensor
 * whose every position is marked becomes RANGE chunks: the whole tensor.
 * @param acc - The merged tensor in fp32 (at least `support.numel` elements).
 * @returns The records in order, framed, in blocks of about {@link PATCH_BLOCK_BYTES}, made one at a time as the
 *   caller asks for the next (so a caller writing each out holds one block, never the tensor's records).
 */
export function* patchTensorRecords(
  name: string,
  shape: readonly (number | bigint)[],
  dtype: Dtype,
  acc: Float32Array,
  support: PatchSupport,
  maxChunkEntries = DEFAULT_MAX_CHUNK_ENTRIES,
): Generator<Uint8Array, void, undefined> {
  const blocks: Uint8Array[] = [];
  let parts: Uint8Array[] = [];
  let partBytes = 0;
  const seal = (): void => {
    blocks.push(frame(parts, partBytes));
    parts = [];
    partBytes = 0;
  };
  const push = (record: DeltaRecord): void => {
    const encoded = DeltaRecord.encode(record).finish();
    parts.push(encoded);
    partBytes += RECORD_LENGTH_BYTES + encoded.length;
    if (partBytes >= PATCH_BLOCK_BYTES) seal();
  };
  push({ tensorBegin: { name, shape: shape.map((d) => BigInt(d)) } });
  const { bits, numel } = support;
  const positions = new Float64Array(Math.min(maxChunkEntries, numel));
  const values = new Float32Array(positions.length);
  const valueDtype = patchValueDtype(dtype);
  let index = 0;
  let crc = 0;
  let kept = 0;
  let n = 0;
  const flush = (): void => {
    for (const chunk of encodeChunks(name, 0, positions.subarray(0, n), values.subarray(0, n), {
      valueDtype,
      firstIndex: index,
      maxChunkEntries,
      numel,
    })) {
      crc = foldChunkCrc(crc, chunk.crc32c);
      index++;
      push({ chunk });
    }
    kept += n;
    n = 0;
  };
  const cap = positions.length;
  if (support.whole()) {
    // Every position: RANGE chunks straight from the accumulator, without listing positions.
    for (let start = 0; start < numel; start += cap) {
      const count = Math.min(cap, numel - start);
      const chunk: SparseChunk = {
        tensor: name,
        partition: 0,
        index,
        firstPosition: BigInt(start),
        count,
        positionCoding: PositionCoding.POSITION_CODING_RANGE,
        golombM: 0,
        positions: Buffer.alloc(0),
        valueDtype,
        values: encodeValues(acc.subarray(start, start + count), dtype),
        crc32c: 0,
      };
      chunk.crc32c = chunkChecksum(chunk);
      crc = foldChunkCrc(crc, chunk.crc32c);
      index++;
      kept += count;
      push({ chunk });
      yield* blocks.splice(0);
    }
  } else {
    for (let byte = 0; byte < bits.length; byte++) {
      let b = bits[byte]!;
      if (b === 0) continue;
      const base = byte << 3;
      if (b === 0xff && n + 8 <= cap) {
        for (let k = 0; k < 8; k++, n++) {
          positions[n] = base + k;
          values[n] = acc[base + k]!;
        }
        if (n === cap) {
          flush();
          yield* blocks.splice(0);
        }
        continue;
      }
      // Only the set bits, lowest first: no branch per unset position.
      while (b !== 0) {
        const k = 31 - Math.clz32(b & -b);
        b &= b - 1;
        positions[n] = base + k;
        values[n] = acc[base + k]!;
        if (++n === cap) flush();
      }
      if (blocks.length > 0) yield* blocks.splice(0);
    }
    if (n > 0) flush();
  }
  push({ tensorEnd: { name, chunkCount: index, keptPerPartition: [BigInt(kept)], crc32c: crc } });
  if (parts.length > 0) seal();
  yield* blocks.splice(0);
}

/** Bytes of records gathered into one block: a tensor's records are never all copied at once. */
export const PATCH_BLOCK_BYTES = 8 * 1024 * 1024;

/** Records, each framed by its little-endian length, in one new buffer of `total` bytes. */
function frame(parts: readonly Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const p of parts) {
    view.setUint32(at, p.length, true);
    out.set(p, at + RECORD_LENGTH_BYTES);
    at += RECORD_LENGTH_BYTES + p.length;
  }
  return out;
}
