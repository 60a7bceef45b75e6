/**
 * CRC-32C (Castagnoli), the checksum of sparse chunks and tensor ends.
 *
 * Castagnoli rather than the zlib polynomial because it is what storage and
 * network stacks (iSCSI, ext4, gRPC compressors) use, so any other language has
 * a fast implementation at hand for an independent reader.
 */

/** Reflected form of the Castagnoli polynomial 0x1EDC6F41. */
const POLY = 0x82f63b78;

/**
 * Eight 256-entry tables (slicing-by-8) in one array: table k at offset
 * 256·k gives the CRC of a byte followed by k zero bytes, so eight input bytes
 * are folded per step instead of one.
 */
const TABLE = buildTable();

function buildTable(): Uint32Array {
  const t = new Uint32Array(8 * 256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[n] = c;
  }
  for (let n = 0; n < 256; n++) {
    let c = t[n]!;
    for (let k = 1; k < 8; k++) {
      c = (c >>> 8) ^ t[c & 0xff]!;
      t[k * 256 + n] = c;
    }
  }
  return t;
}

/**
 * CRC-32C of `data`, continuing from `seed`.
 *
 * The seed is a previous result, so `crc32c(b, crc32c(a))` equals the CRC of
 * `a` followed by `b`: a checksum over several separate buffers needs no
 * concatenation. The standard check value holds: `crc32c("123456789")` is
 * `0xE3069283`.
 *
 * @param data - Bytes to checksum.
 * @param seed - CRC of the bytes before `data`. @default 0 (nothing before)
 * @returns The CRC as an unsigned 32-bit integer.
 */
export function crc32c(data: Uint8Array, seed = 0): number {
  const t = TABLE;
  const n = data.length;
  let c = ~seed;
  let i = 0;
  for (const end = n - 7; i < end; i += 8) {
    const a = c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24));
    const b = data[i + 4]! | (data[i + 5]! << 8) | (data[i + 6]! << 16) | (data[i + 7]! << 24);
    c =
      t[1792 + (a & 0xff)]! ^
      t[1536 + ((a >>> 8) & 0xff)]! ^
      t[1280 + ((a >>> 16) & 0xff)]! ^
      t[1024 + (a >>> 24)]! ^
      t[768 + (b & 0xff)]! ^
      t[512 + ((b >>> 8) & 0xff)]! ^
      t[256 + ((b >>> 16) & 0xff)]! ^
      t[b >>> 24]!;
  }
  for (; i < n; i++) c = (c >>> 8) ^ t[(c ^ data[i]!) & 0xff]!;
  return ~c >>> 0;
}
