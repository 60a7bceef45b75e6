/**
 * Writing small state files so that a crash at any instant leaves either the
 * old content or the new one, never a mix: temporary file, fsync, rename,
 * fsync of the folder.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { syncFolder } from '../proto/fs-sync.js';

/** Suffix of temporary files written by {@link writeFileDurably}; a crash can leave some behind, removed at start. */
export const TEMP_MARK = '.tmp-';

/**
 * Replaces `path` with `data` atomically and durably.
 * @throws Error from the file system; `path` is then unchanged.
 */
export async function writeFileDurably(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = join(dirname(path), `${basename(path)}${TEMP_MARK}${randomBytes(6).toString('hex')}`);
  const fh = await open(tmp, 'wx');
  try {
    await fh.writeFile(data);
    await fh.sync();
    await fh.close();
    await rename(tmp, path);
  } catch (err) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
  await syncFolder(dirname(path));
}
