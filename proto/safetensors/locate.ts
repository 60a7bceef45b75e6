/**
 * Finds the weight files of a checkpoint given as a folder or a file.
 */

import { readdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { FormatError } from '../errors.js';
import { INDEX_FILE_NAME, SINGLE_FILE_NAME } from './layout.js';

/** Where a checkpoint's weights are. */
export type CheckpointLocation =
  { sharded: true; dir: string; indexFile: string } | { sharded: false; dir: string; file: string };

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/**
 * Resolves `path` to a shard index or a single weight file. A folder is
 * looked up in this order: `model.safetensors.index.json`,
 * `model.safetensors`, then its only `*.safetensors` file if it has exactly
 * one (so a folder written from a layout with another file name opens too).
 * @throws FormatError naming the folder if none of those exist.
 * @throws The fs error if `path` does not exist.
 */
export async function locateCheckpoint(path: string): Promise<CheckpointLocation> {
  const abs = resolve(path);
  const st = await stat(abs);
  if (st.isFile()) return { sharded: false, dir: join(abs, '..'), file: abs };
  if (!st.isDirectory()) throw new FormatError(`not a file or folder`, { file: abs });
  const indexFile = join(abs, INDEX_FILE_NAME);
  if (await isFile(indexFile)) return { sharded: true, dir: abs, indexFile };
  const single = join(abs, SINGLE_FILE_NAME);
  if (await isFile(single)) return { sharded: false, dir: abs, file: single };
  const candidates = (await readdir(abs)).filter((n) => n.endsWith('.safetensors'));
  if (candidates.length === 1) return { sharded: false, dir: abs, file: join(abs, candidates[0]!) };
  throw new FormatError(
    `folder has no ${INDEX_FILE_NAME}, no ${SINGLE_FILE_NAME} and ${candidates.length} other *.safetensors files (need exactly 1)`,
    { file: abs },
  );
}
