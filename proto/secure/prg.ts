/**
 * The pseudo-random generator of masks: the AES-256-CTR keystream of a 32-byte
 * key (counter starting at zero) read as little-endian uint32 words. Word w
 * comes from counter block ⌊w/4⌋, so any range of a mask can be generated on
 * its own (a server or party can mask and unmask a long vector chunk by chunk).
 */
import { createCipheriv } from 'node:crypto';
import { endianness } from 'node:os';

/** Words per cipher call: 64 KiB of keystream, which stays in cache (docs/performance.md). */
const PIECE_WORDS = 1 << 14;
let zeroBuffer: Buffer | undefined;
/** The plaintext of the keystream, allocated on first use. */
function zeros(): Buffer {
  return (zeroBuffer ??= Buffer.alloc(PIECE_WORDS * 4));
}

let littleEndian = false;
/** Uint32Array views read the platform's byte order; every party must read the same words. */
function requireLittleEndian(): void {
  if (littleEndian) return;
  if (endianness() !== 'LE') throw new Error('secure aggregation needs a little-endian platform');
  littleEndian = true;
}

function counterIv(block: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64BE(BigInt(block), 8);
  return iv;
}

/**
 * Words `[offset, offset + count)` of the stream of `key`, in pieces:
 * yields each piece with the index of its first word relative to `offset`.
 */
function* pieces(key: Uint8Array, offset: number, count: number): Generator<[Uint32Array, number]> {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(`PRG range: bad offset ${offset} or count ${count}`);
  }
  requireLittleEndian();
  const skip = offset % 4;
  const cipher = createCipheriv('aes-256-ctr', key, counterIv((offset - skip) / 4));
  cipher.update(zeros().subarray(0, skip * 4));
  for (let start = 0; start < count; start += PIECE_WORDS) {
    const n = Math.min(PIECE_WORDS, count - start);
    let bytes = cipher.update(zeros().subarray(0, n * 4));
    if (bytes.byteOffset % 4 !== 0) bytes = Buffer.from(bytes);
    yield [new Uint32Array(bytes.buffer, bytes.byteOffset, n), start];
  }
}

/** Words `[offset, offset + count)` of the stream of `key`. */
export function prgWords(key: Uint8Array, offset: number, count: number): Uint32Array {
  const out = new Uint32Array(count);
  for (const [ks, start] of pieces(key, offset, count)) out.set(ks, start);
  return out;
}

/**
 * Adds (sign 1) or subtracts (sign −1) words `[offset, offset + into.length)`
 * of the stream of `key` to `into`, modulo 2^32, in place.
 */
export function addPrg(into: Uint32Array, key: Uint8Array, offset: number, sign: 1 | -1): void {
  for (const [ks, start] of pieces(key, offset, into.length)) {
    const dst = into.subarray(start, start + ks.length);
    // Uint32Array stores ToUint32 of the result: the sum or difference wraps modulo 2^32.
    if (sign === 1) for (let k = 0; k < ks.length; k++) dst[k] = dst[k]! + ks[k]!;
    else for (let k = 0; k < ks.length; k++) dst[k] = dst[k]! - ks[k]!;
  }
}
