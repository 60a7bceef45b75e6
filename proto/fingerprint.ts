/**
 * A fingerprint of a base checkpoint, so that a delta is only ever applied to
 * the base it was computed against.
 */

import { createHash } from 'node:crypto';
import type { TensorInfo } from './safetensors/layout.js';
import type { Checkpoint } from './safetensors/reader.js';

/** Version tag of the scheme below; bump it if anything hashed changes. */
const VERSION = 'fp1';
/** Size of one sampled block. */
export const FINGERPRINT_BLOCK_BYTES = 4096;
/** Blocks sampled per tensor: first, last, and 14 evenly spaced between. */
export const FINGERPRINT_BLOCKS = 16;
/** Tensors whose blocks are being read while an earlier one is hashed. */
const READ_AHEAD = 8;

/** Byte offsets of the blocks sampled from a tensor of `byteLength` bytes, or `[0]` with the whole tensor if it is small. */
function sampleRanges(byteLength: number): [start: number, length: number][] {
  if (byteLength <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES) return [[0, byteLength]];
  const last = byteLength - FINGERPRINT_BLOCK_BYTES;
  const ranges: [number, number][] = [];
  for (let k = 0; k < FINGERPRINT_BLOCKS; k++) {
    ranges.push([Math.floor((last * k) / (FINGERPRINT_BLOCKS - 1)), FINGERPRINT_BLOCK_BYTES]);
  }
  return ranges;
}

/**
 * Fingerprints a checkpoint's tensors, independently of how they are split
 * into files.
 *
 * Scheme `fp1`: SHA-256 over, for each tensor in order of name (UTF-16 code
 * unit order), the line `JSON.stringify([name, dtype, shape])` followed by
 * sampled content: a tensor of at most 64 KiB is hashed whole; a larger one
 * contributes 16 blocks of 4 KiB, the first, the last, and 14 at offsets
 * `floor(k * (byteLength - 4096) / 15)` for k = 1..14, in that order. File
 * names, shard boundaries, tensor order in files and `__metadata__` are not
 * covered, so sharded and unsharded copies of the same tensors agree.
 *
 * Limit: this is a sample, not a checksum. About 64 KiB is read per tensor
 * (so a 14 GB checkpoint costs a few megabytes of reads), and a change
 * confined to bytes outside the sampled blocks is **not** detected. That
 * suits its purpose — telling different base models or revisions apart,
 * which differ almost everywhere — not detecting corruption.
 * @param ckpt An open checkpoint.
 * @param opts `signal` aborts between reads.
 * @returns `fp1:sha256:<64 hex digits>`.
 * @throws FormatError / TruncatedError if a tensor cannot be read.
 */
export async function baseFingerprint(ckpt: Checkpoint, opts: { signal?: AbortSignal } = {}): Promise<string> {
  const hash = createHash('sha256');
  hash.update(`${VERSION}\n`);
  const tensors = ckpt.tensors().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const readOpts = opts.signal === undefined ? {} : { signal: opts.signal };
  const sample = (t: TensorInfo): Promise<Uint8Array[]> =>
    Promise.all(
      sampleRanges(t.byteLength).map(([start, length]) => ckpt.readRawRange(t.name, start, length, readOpts)),
    );
  // Tensors are read a few ahead (on a cold disk each block is a seek) but
  // hashed strictly in order.
  const ahead: Promise<Uint8Array[]>[] = [];
  let next = 0;
  for (const t of tensors) {
    while (ahead.length < READ_AHEAD && next < tensors.length) {
      const p = sample(tensors[next++]!);
      // Marked handled now; the error still surfaces when its turn comes.
      p.catch(() => undefined);
      ahead.push(p);
    }
    const blocks = await ahead.shift()!;
    hash.update(`${JSON.stringify([t.name, t.dtype, t.shape])}\n`);
    for (const b of blocks) hash.update(b);
  }
  return `${VERSION}:sha256:${hash.digest('hex')}`;
}
