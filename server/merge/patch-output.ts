/**
 * The merge driver's hook for the merged patch. Tensor tasks run in any order,
 * on any replica: each writes its tensor's framed records to a piece file of
 * its own (named by the tensor's index in the base) in a folder beside the
 * dense output; the commit concatenates the pieces in the base's order behind
 * the header into the patch file. docs/design/job-flow.md, "Merged patch".
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { MergeOutput } from '../../proto/gen/dppa/v1/jobs.js';
import { PATCH_FILE_NAME, patchHeader } from '../../proto/patch/index.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import type { MergedFileInfo } from '../jobs/job-store.js';
import { PatchWriter } from './patch-writer.js';

/** What a job's `merge.output` asks the merge to write. */
export function mergeOutputs(output: MergeOutput): { dense: boolean; patch: boolean } {
  return {
    dense: output !== MergeOutput.MERGE_OUTPUT_PATCH,
    patch: output !== MergeOutput.MERGE_OUTPUT_DENSE,
  };
}

/** The patch file of a job whose folder is `jobDir`. */
export function patchPath(jobDir: string): string {
  return join(jobDir, PATCH_FILE_NAME);
}

/** The folder of a merge's patch pieces, beside its dense output's work folder `workDir` (removed with it). */
export function piecesDir(workDir: string): string {
  return `${workDir}.patch`;
}

/** Creates the pieces folder (if missing). */
export async function createPieces(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
}

/**
 * Writes one tensor's records as its piece, durably: under its name only when
 * complete, replacing the piece of an earlier run of the same task.
 * @param index - The tensor's index in the base.
 */
export async function writePiece(dir: string, index: number, records: readonly Uint8Array[]): Promise<void> {
  const tmp = join(dir, `${index}.tmp-${randomBytes(6).toString('hex')}`);
  const fh = await open(tmp, 'w');
  try {
    for (const r of records) for (let done = 0; done < r.length;) done += (await fh.write(r, done)).bytesWritten;
    await fh.datasync();
  } catch (err) {
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await rename(tmp, join(dir, String(index)));
}

/**
 * The patch file at `path`, from the pieces in `dir` when they are there (the
 * tensors with a piece make the header, in the base's order), then the pieces
 * removed. Run again after a crash: with the pieces gone, the file is already
 * in place and is described as it is.
 * @returns Its name, size and SHA-256.
 */
export async function commitPatch(
  path: string,
  dir: string,
  base: Checkpoint,
  baseFingerprint: string,
): Promise<MergedFileInfo> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return describe(path);
    throw err;
  }
  const pieces = new Set(names.filter((n) => /^\d+$/.test(n)).map(Number));
  const tensors = base.tensors();
  const changed = tensors.flatMap((t, index) => (pieces.has(index) ? [{ t, index }] : []));
  const writer = await PatchWriter.create(
    path,
    patchHeader(
      baseFingerprint,
      changed.map((c) => c.t),
    ),
  );
  let info: MergedFileInfo;
  try {
    for (const { index } of changed) await writer.appendFile(join(dir, String(index)));
    info = await writer.close();
  } finally {
    await writer.abort();
  }
  await rm(dir, { recursive: true, force: true });
  return info;
}

/** Name, size and SHA-256 of a patch file already written. */
async function describe(path: string): Promise<MergedFileInfo> {
  const hash = createHash('sha256');
  for await (const block of createReadStream(path)) hash.update(block as Buffer);
  return { path: basename(path), size: (await stat(path)).size, sha256: hash.digest('hex') };
}
