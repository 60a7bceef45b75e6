/**
 * Small file-system helpers: writing checkpoints durably, reading words at an offset.
 */

import { copyFile, open, readdir, stat, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** Bytes per write call; libuv caps a single write below 2 GiB. */
const WRITE_CHUNK = 1 << 30;

/** True if `path` exists (as anything). */
export async function exists(path: string): Promise<boolean> {
  return (await sizeOf(path)) !== undefined;
}

/** Size of `path` in bytes, or undefined when it does not exist. @throws Error from the file system but ENOENT. */
export async function sizeOf(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** Writes all of `bytes` at `position`, looping over short writes. */
export async function writeAllAt(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.byteLength) {
    const { bytesWritten } = await fh.write(
      bytes,
      done,
      Math.min(WRITE_CHUNK, bytes.byteLength - done),
      position + done,
    );
    done += bytesWritten;
  }
}

/**
 * Reads `count` uint32 words (little-endian, the host's order) of the file at `path` from word `offset` on, looping
 * over short reads.
 * @param short - The error thrown when the file ends before the last word.
 */
export async function readWordsAt(
  path: string,
  offset: number,
  count: number,
  short: () => Error,
): Promise<Uint32Array> {
  const out = new Uint32Array(count);
  const buf = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  const fh = await open(path, 'r');
  try {
    for (let done = 0; done < buf.byteLength;) {
      const { bytesRead } = await fh.read(buf, done, buf.byteLength - done, offset * 4 + done);
      if (bytesRead === 0) throw short();
      done += bytesRead;
    }
  } finally {
    await fh.close();
  }
  return out;
}

/** fsyncs a file or folder by path (a folder's fsync makes renames in it durable). */
export async function syncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Weight files of any format: copying them next to new weights would leave
 * stale weights a loader might pick up instead of the new ones.
 */
const WEIGHT_FILE = /\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf)(\.index\.json)?$/;

/**
 * Copies the regular files (symlinks followed, as in the Hugging Face cache)
 * at the top of a checkpoint folder that are not weight files: config.json,
 * tokenizer files, generation config, README, and so on.
 * @param from The source folder, or a file in it.
 * @param to The destination folder.
 * @returns The names copied.
 */
export async function copyExtraFiles(from: string, to: string): Promise<string[]> {
  const src = (await stat(from)).isFile() ? dirname(from) : from;
  const copied: string[] = [];
  for (const name of await readdir(src)) {
    if (WEIGHT_FILE.test(name)) continue;
    if (!(await stat(join(src, name))).isFile()) continue;
    await copyFile(join(src, name), join(to, name));
    copied.push(name);
  }
  return copied;
}
