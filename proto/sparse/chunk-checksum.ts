/**
 * The CRC-32C of a sparse chunk and of a tensor's chunk list, over bytes specified in docs/formats.md ("Chunk
 * checksum") rather than the protobuf encoding. See docs/design/sparse-chunks.md.
 */
import { crc32c } from '@node-rs/crc32';
import type { SparseChunk } from '../gen/dppa/v1/sparse.js';

/**
 * CRC-32C (Castagnoli) of bytes, continuing from `seed` (a previous result, so
 * `crc32c(b, crc32c(a))` is the CRC of `a` then `b`); `crc32c("123456789")` is
 * `0xE3069283`. The SIMD implementation of `@node-rs/crc32`, whose package
 * ships prebuilt binaries and a WebAssembly build for other platforms.
 * Castagnoli rather than the zlib polynomial because storage and network
 * stacks use it, so other languages have a fast one at hand.
 */
export { crc32c };

/** Length of the fixed-size little-endian prefix covered by a chunk's CRC. */
export const CHUNK_KEY_BYTES = 32;

const utf8 = new TextEncoder();

/**
 * CRC-32C of a chunk as stored in its `crc32c` field: over the 32-byte
 * little-endian key [partition u32, index u32, first_position u64, count u32,
 * position_coding u32, golomb_m u32, value_dtype u32], then the UTF-8 tensor
 * name, then the `positions` bytes, then the `values` bytes.
 *
 * @param chunk - The chunk; its own `crc32c` field is ignored.
 * @returns The CRC as an unsigned 32-bit integer.
 */
export function chunkChecksum(chunk: SparseChunk): number {
  const key = new DataView(new ArrayBuffer(CHUNK_KEY_BYTES));
  key.setUint32(0, chunk.partition, true);
  key.setUint32(4, chunk.index, true);
  key.setBigUint64(8, BigInt.asUintN(64, chunk.firstPosition), true);
  key.setUint32(16, chunk.count, true);
  // Enums are int32 on the wire; an unknown negative value is covered as its two's complement.
  key.setUint32(20, chunk.positionCoding >>> 0, true);
  key.setUint32(24, chunk.golombM, true);
  key.setUint32(28, chunk.valueDtype >>> 0, true);
  let crc = crc32c(new Uint8Array(key.buffer));
  crc = crc32c(utf8.encode(chunk.tensor), crc);
  crc = crc32c(chunk.positions, crc);
  return crc32c(chunk.values, crc);
}

/**
 * Folds one chunk's CRC into the running CRC of a tensor's chunk list (the
 * `TensorEnd.crc32c`), which covers each chunk CRC as 4 little-endian bytes.
 *
 * @param listCrc - CRC of the chunks before; 0 for the first.
 * @param chunkCrc - The chunk's `crc32c`.
 * @returns The CRC including this chunk.
 */
export function foldChunkCrc(listCrc: number, chunkCrc: number): number {
  const le = new Uint8Array(4);
  new DataView(le.buffer).setUint32(0, chunkCrc, true);
  return crc32c(le, listCrc);
}
