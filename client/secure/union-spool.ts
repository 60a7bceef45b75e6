/**
 * The union U as a party keeps it while it codes its masked vector: the positions GetSupport streams are written to
 * a file of its working folder (uint32 little-endian, tensor after tensor) and read back one tensor at a time, so
 * the party never holds more of U than one tensor's positions.
 */
import { open } from 'node:fs/promises';
import { readWordsAt } from '../../proto/safetensors/fs-util.js';
import type { PartyUnion } from './masked-vector.js';

/** One piece of U as it arrives: positions of one tensor, in order. */
export interface UnionPiece {
  tensor: string;
  positions: ArrayLike<number>;
}

/**
 * Writes the pieces to `path` (replacing what it held) and gives U read back from it.
 * @throws Error from the pieces (the stream) or the file system.
 */
export async function spoolUnion(
  path: string,
  pieces: AsyncIterable<UnionPiece> | Iterable<UnionPiece>,
): Promise<PartyUnion> {
  const tensors: { name: string; count: number }[] = [];
  const offsets: number[] = [];
  let size = 0;
  const fh = await open(path, 'w', 0o600);
  try {
    // The mode given to open applies only when it creates the file: a file already there keeps its own.
    await fh.chmod(0o600);
    for await (const p of pieces) {
      if (tensors.at(-1)?.name !== p.tensor) {
        tensors.push({ name: p.tensor, count: 0 });
        offsets.push(size);
      }
      const words = Uint32Array.from(p.positions);
      await fh.write(Buffer.from(words.buffer, words.byteOffset, words.byteLength));
      tensors.at(-1)!.count += words.length;
      size += words.length;
    }
  } finally {
    await fh.close();
  }
  return {
    tensors,
    positions: (k) =>
      readWordsAt(
        path,
        offsets[k]!,
        tensors[k]!.count,
        () => new Error(`${path}: ends before tensor ${tensors[k]!.name}`),
      ),
  };
}
