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
import { basename, dirname, join } from 'node:path';
import { syncFolder } from '../../proto/fs-sync.js';
import { MergeOutput } from '../../proto/gen/dppa/v1/jobs.js';
import { PATCH_FILE_NAME, patchHeader } from '../../proto/patch/index.js';
import { exists } from '../../proto/safetensors/fs-util.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import type { MergedFileInfo } from '../jobs/job-store.js';
import { JOIN_BLOCK_BYTES, PatchWriter } from './patch-writer.js';

/** What a job's `merge.output` asks the merge to write. */
export function mergeOutputs(output: MergeOutput): { dense: boolean; patch: boolean } {
  return {
    dense: output !== MergeOutput.MERGE_OUTPUT_PATCH,
    patch: output !== MergeOutput.MERGE_OUTPUT_DENSE,
  };
}

/**
 * Disk space a merge of a `baseBytes` base writes at most: the dense
 * checkpoint (the base's size), and the patch held twice while its pieces are
 * joined, each at most about the base's size (every position changed: values
 * in the base's dtype, positions about a bit each).
 */
export function mergeSpaceBytes(output: MergeOutput, baseBytes: number): number {
  const { dense, patch } = mergeOutputs(output);
  return (dense ? baseBytes : 0) + (patch ? 2 * Math.ceil(baseBytes * (17 / 16)) : 0);
}

/**
 * What of {@link mergeSpaceBytes} a merge paused by a full disk still needs:
 * less the dense tensors already written (`written`, when the work folder is
 * still there: the output is laid out sparse, a tensor takes room once
 * written) and the pieces folder's files (each is joined once more).
 * @param written - Bitmap of the tensors written (bit i: tensor i of `base`).
 * @param workDir - The dense output's work folder; the pieces are in {@link piecesDir}.
 */
export async function mergeSpaceLeft(
  output: MergeOutput,
  baseBytes: number,
  base: Checkpoint,
  written: Uint8Array,
  workDir: string,
): Promise<number> {
  const { dense, patch } = mergeOutputs(output);
  let held = 0;
  if (dense && (await exists(workDir)))
    base.tensors().forEach((t, i) => {
      if (((written[i >> 3] ?? 0) & (1 << (i & 7))) !== 0) held += t.byteLength;
    });
  if (patch) held += await folderBytes(piecesDir(workDir));
  return Math.max(0, mergeSpaceBytes(output, baseBytes) - held);
}

/** Total size of the files in a folder (0 when there is none). */
async function folderBytes(dir: string): Promise<number> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
  // A file removed meanwhile (a piece replaced, the folder joined) takes no room.
  const sizes = await Promise.all(
    names.map((n) =>
      stat(join(dir, n)).then(
        (s) => s.size,
        () => 0,
      ),
    ),
  );
  return sizes.reduce((a, b) => a + b, 0);
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

/** A piece's first bytes: what it is and its format's version (a piece of another version is rewritten). */
export const PIECE_MAGIC = Uint8Array.from(Buffer.from('DPPApc\x00\x01', 'latin1'));

/** Bytes of the SHA-256 of the base tensor, after the magic: for the patch header. */
export const PIECE_HASH_BYTES = 32;

/** Bytes before a piece's records: the magic and the base tensor's SHA-256. */
export const PIECE_PREFIX_BYTES = PIECE_MAGIC.byteLength + PIECE_HASH_BYTES;

/**
 * Writes one tensor's piece, durably: {@link PIECE_MAGIC}, the SHA-256 of the base tensor, then its
 * records block by block as `records` makes them (so only one block is held
 * at a time; the next is made while the last is written). Under its name only
 * when complete, replacing the piece of an earlier run of the same task.
 * @param index - The tensor's index in the base.
 * @param baseSha256 - SHA-256 of the base tensor's bytes (32 bytes).
 */
export async function writePiece(
  dir: string,
  index: number,
  baseSha256: Uint8Array,
  records: Iterable<Uint8Array>,
): Promise<void> {
  if (baseSha256.byteLength !== PIECE_HASH_BYTES) throw new RangeError('writePiece: baseSha256 must be 32 bytes');
  const tmp = join(dir, `${index}.tmp-${randomBytes(6).toString('hex')}`);
  const fh = await open(tmp, 'w');
  const write = async (r: Uint8Array): Promise<void> => {
    for (let done = 0; done < r.length;) done += (await fh.write(r, done)).bytesWritten;
  };
  let pending: Promise<void> = write(Buffer.concat([PIECE_MAGIC, baseSha256]));
  try {
    for (const r of records) {
      await pending;
      pending = write(r);
    }
    await pending;
    await fh.datasync();
  } catch (err) {
    await pending.catch(() => undefined);
    await fh.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await rename(tmp, join(dir, String(index)));
  // The tensor's written bit is saved durably next: its piece must survive a crash too.
  await syncFolder(dir);
}

/** A tensor some party changed has no usable piece (none, cut short, another format): joining would write a patch that leaves it out. */
export class MissingPieceError extends Error {
  constructor(
    readonly tensor: string,
    readonly index: number,
    why = 'is missing',
  ) {
    super(`merged patch: the piece of tensor "${tensor}" (index ${index}) ${why}`);
    this.name = 'MissingPieceError';
  }
}

/** The name the pieces folder takes once joined (then removed): never joined again. */
export function joinedDir(dir: string): string {
  return `${dir}.joined`;
}

/**
 * The patch file at `path`, joined from the pieces in `dir` (in the base's
 * order) when that folder is there, then the folder renamed to
 * {@link joinedDir} (atomically: never joined again) and removed. A commit run
 * again, or racing another replica's, that finds the folder gone describes the
 * file in place (whatever error the folder's disappearance caused: NFS gives
 * ESTALE). Every tensor of `changed` must have its piece, starting with
 * {@link PIECE_MAGIC}: a piece missing, cut short or of another version is
 * made again by `rerun` (the tensor merged again, for its piece only) and
 * checked once more; {@link MissingPieceError} (nothing written) when there is
 * no `rerun` or its piece is still unusable.
 * @param changed - Names of the tensors some party changed (called only to join).
 * @param rerun - Writes the piece of tensor `index` of the base again.
 * @returns Its name, size and SHA-256.
 */
export async function commitPatch(
  path: string,
  dir: string,
  base: Checkpoint,
  baseFingerprint: string,
  changed: () => Promise<ReadonlySet<string>>,
  rerun?: (tensor: { name: string; index: number }) => Promise<void>,
): Promise<MergedFileInfo> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if (await gone(dir)) return describe(path);
    throw err;
  }
  const pieces = new Set(names.filter((n) => /^\d+$/.test(n)).map(Number));
  const expected = await changed();
  const joined = base
    .tensors()
    .map((t, index) => ({ t, index }))
    .filter(({ t }) => expected.has(t.name));
  const hashes: Uint8Array[] = [];
  try {
    for (const { t, index } of joined) {
      const file = join(dir, String(index));
      let hash = pieces.has(index) ? await pieceHash(file) : 'is missing';
      if (typeof hash === 'string') {
        // Another commit may have joined and renamed the folder since the listing.
        if (await gone(dir)) return describe(path);
        if (rerun === undefined) throw new MissingPieceError(t.name, index, hash);
        await rerun({ name: t.name, index });
        const again = await pieceHash(file).catch((err: unknown) => {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'is missing';
          throw err;
        });
        if (typeof again === 'string') {
          if (await gone(dir)) return describe(path);
          throw new MissingPieceError(t.name, index, `${hash}, and ${again} after its tensor was merged again`);
        }
        hash = again;
      }
      hashes.push(hash);
    }
  } catch (err) {
    if (!(err instanceof MissingPieceError) && (await gone(dir))) return describe(path);
    throw err;
  }
  let writer: PatchWriter | undefined;
  let info: MergedFileInfo;
  try {
    writer = await PatchWriter.create(
      path,
      patchHeader(
        baseFingerprint,
        joined.map((c, i) => ({ name: c.t.name, shape: c.t.shape, baseSha256: hashes[i]! })),
      ),
    );
    for (const { index } of joined) await writer.appendFile(join(dir, String(index)), PIECE_PREFIX_BYTES);
    info = await writer.close();
  } catch (err) {
    // Another commit joined the same pieces and renamed the folder meanwhile: its file is in place.
    if (await gone(dir)) return describe(path);
    throw err;
  } finally {
    await writer?.abort();
  }
  // The file is in place and synced; from here on the pieces are never joined again.
  try {
    await rename(dir, joinedDir(dir));
    await syncFolder(dirname(dir));
  } catch (err) {
    // Gone: another commit renamed it (after joining the same pieces).
    if (!(await gone(dir))) throw err;
  }
  await rm(joinedDir(dir), { recursive: true, force: true });
  await removeLeftovers(path);
  return info;
}

/** Whether the folder is no longer there (a stat that fails otherwise counts as there). */
async function gone(dir: string): Promise<boolean> {
  return !(await exists(dir).catch(() => true));
}

/**
 * The base tensor's SHA-256 a piece holds after its magic, or why it has none:
 * cut short, or not starting with {@link PIECE_MAGIC} (another version).
 */
async function pieceHash(file: string): Promise<Uint8Array | string> {
  const fh = await open(file, 'r');
  try {
    const prefix = new Uint8Array(PIECE_PREFIX_BYTES);
    const { bytesRead } = await fh.read(prefix, 0, PIECE_PREFIX_BYTES, 0);
    if (bytesRead !== PIECE_PREFIX_BYTES) return 'is cut short';
    if (!Buffer.from(prefix.subarray(0, PIECE_MAGIC.byteLength)).equals(PIECE_MAGIC))
      return 'does not start with the piece magic of this version';
    return prefix.slice(PIECE_MAGIC.byteLength);
  } finally {
    await fh.close();
  }
}

/**
 * Removes the temporary files (`<patch>.tmp-*`) that commits which crashed or
 * lost a race left beside the patch. A commit racing this one may be writing
 * one of them: it then fails with ENOENT and, its folder gone, describes the
 * joined file (see {@link commitPatch}).
 */
async function removeLeftovers(path: string): Promise<void> {
  const prefix = `${basename(path)}.tmp-`;
  const folder = dirname(path);
  let names: string[];
  try {
    names = await readdir(folder);
  } catch {
    return;
  }
  await Promise.all(names.filter((n) => n.startsWith(prefix)).map((n) => rm(join(folder, n), { force: true })));
}

/** Name, size and SHA-256 of a patch file already written (its pieces joined: leftovers of other commits removed). */
async function describe(path: string): Promise<MergedFileInfo> {
  await removeLeftovers(path);
  const hash = createHash('sha256');
  for await (const block of createReadStream(path, { highWaterMark: JOIN_BLOCK_BYTES })) hash.update(block as Buffer);
  return { path: basename(path), size: (await stat(path)).size, sha256: hash.digest('hex') };
}
