/**
 * Download of a merged checkpoint, file by file, into `OUT.tmp-JOB/`: each
 * chunk checked against its CRC-32C, each file against its SHA-256, resumed
 * from the bytes on disk after a dropped stream (or a new run), and renamed to
 * `OUT` only once every file is complete and verified. The merged patch comes
 * the same way, and is either kept (`patch`) or applied to a local base (`base`).
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, mkdir, open, readdir, rename, rm, stat, truncate } from 'node:fs/promises';
import { dirname, join, resolve, sep } from 'node:path';
import { FormatError } from '../../proto/errors.js';
import { baseFingerprint } from '../../proto/fingerprint.js';
import { applyPatch, type ApplyPatchReport, PatchBaseMismatchError } from '../../proto/patch/index.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { crc32c } from '../../proto/sparse/index.js';
import { CallScope, inScope, readStream, type CallOptions } from './call.js';
import type { Connection } from './connection.js';
import { DownloadError, DppaRpcError } from './errors.js';
import { isTransient } from './retry.js';
import { syncFolder } from '../../proto/fs-sync.js';

/** What {@link DppaClient.pull} downloads, and where. */
export interface PullOptions {
  /** Id of a merged job. */
  jobId: string;
  /**
   * Folder to create with the merged checkpoint; must not exist. Files are
   * assembled in `OUT.tmp-JOB` beside it, kept after a failure so that running
   * the same pull again resumes.
   */
  out: string;
  /**
   * Download the merged patch instead (docs/formats.md, "Merged patch"): `out` is then the
   * `.dppa` file to create. @default false
   */
  patch?: boolean | undefined;
  /**
   * The base checkpoint the job merged into: download the merged patch and apply it to this
   * base, writing the merged checkpoint at `out` (bit for bit the server's dense merge). A
   * patch for another base, or a damaged one, is refused and nothing is written. @default none
   */
  base?: string | undefined;
}

/** Progress of a pull. */
export interface PullProgress {
  /** The file being downloaded, as listed by the server. */
  file: string;
  /** Files complete and verified. */
  filesDone: number;
  /** Files of the checkpoint. */
  filesTotal: number;
  /** Bytes on disk, of every file (those resumed from an earlier run included). */
  bytesDone: number;
  /** Bytes of the whole checkpoint. */
  bytesTotal: number;
  /** Download attempt of the current file, from 1; above 1 after a dropped stream. */
  attempt: number;
}

/** Call options of {@link DppaClient.pull}. */
export interface PullCallOptions extends CallOptions {
  /** Called after every chunk written and every file verified. @default none */
  onProgress?: ((p: PullProgress) => void) | undefined;
}

/** One file of a pulled checkpoint. */
export interface PulledFile {
  /** Path relative to the checkpoint folder. */
  path: string;
  /** Size in bytes. */
  size: number;
  /** Lower-case hex SHA-256, checked. */
  sha256: string;
}

/** What {@link DppaClient.pull} did. */
export interface PullResult {
  /** The folder written (`PullOptions.out`). */
  out: string;
  /** Every file of the checkpoint. */
  files: PulledFile[];
  /** Bytes received from the server by this pull. */
  bytesDownloaded: number;
  /** Bytes found on disk from an earlier, interrupted pull and kept. */
  bytesResumed: number;
  /** With `base`: what applying the patch wrote (`files` then lists the patch downloaded). */
  applied?: ApplyPatchReport;
}

/** A chunk whose bytes do not match its CRC: damaged in transit, fetched again. */
class CorruptChunkError extends Error {
  override name = 'CorruptChunkError';
}

/** The stream ended (status OK) before the end of the file: resumed like a drop. */
class ShortStreamError extends Error {
  override name = 'ShortStreamError';
}

/** Rejects paths that would leave the output folder or that mean different files on different systems. */
function checkPath(p: string): string {
  const parts = p.split('/');
  if (
    p === '' ||
    p.startsWith('/') ||
    /[\\\0]/.test(p) ||
    /^[A-Za-z]:/.test(p) ||
    parts.some((s) => s === '' || s === '.' || s === '..')
  ) {
    throw new DownloadError(
      p,
      'unsafe path in the file list: a merged file must be a relative path inside the checkpoint folder',
    );
  }
  return p;
}

function listedFile(f: { path: string; size: bigint; sha256: string }): PulledFile {
  const path = checkPath(f.path);
  if (f.size > BigInt(Number.MAX_SAFE_INTEGER)) throw new DownloadError(path, `listed size ${f.size} is too large`);
  const sha256 = f.sha256.toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(sha256))
    throw new DownloadError(path, `listed SHA-256 ${JSON.stringify(f.sha256)} is not 64 hex digits`);
  return { path, size: Number(f.size), sha256 };
}

async function sizeOnDisk(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/** SHA-256 state over the first `size` bytes of a file already on disk. */
async function hashPrefix(path: string, size: number, signal: AbortSignal): Promise<Hash> {
  const hash = createHash('sha256');
  if (size === 0) return hash;
  for await (const chunk of createReadStream(path, { start: 0, end: size - 1, signal })) hash.update(chunk as Buffer);
  return hash;
}

/** Removes files of an earlier run that are not in the list, so that `out` holds exactly the checkpoint. */
async function removeStrays(dir: string, keep: ReadonlySet<string>): Promise<void> {
  for (const rel of await readdir(dir, { recursive: true })) {
    const path = join(dir, rel);
    if ((await lstat(path)).isDirectory()) continue;
    if (!keep.has(rel.split(sep).join('/'))) await rm(path, { force: true });
  }
}

interface Transfer {
  conn: Connection;
  /** The merged patch, not checkpoint files. */
  patch: boolean;
  jobId: string;
  scope: CallScope;
  bytesDone: number;
  bytesDownloaded: number;
  report(file: string, attempt: number): void;
}

/** Downloads one file into `local`, resuming from what is on disk; verifies it. */
async function downloadFile(t: Transfer, file: PulledFile, local: string): Promise<void> {
  const { conn, scope } = t;
  const backoff = conn.backoff();
  await mkdir(dirname(local), { recursive: true });
  let size = await sizeOnDisk(local);
  if (size > file.size) {
    await truncate(local, 0);
    size = 0;
  }
  t.bytesDone += size;
  let hash: Hash | undefined;
  let restarted = false;
  for (let attempt = 1; ; attempt++) {
    scope.check();
    // The hash must cover exactly the bytes on disk before more are appended.
    hash ??= await hashPrefix(local, size, scope.signal);
    if (size === file.size) {
      const digest = hash.digest('hex');
      if (digest === file.sha256) return;
      // A stale or damaged file from an earlier run: start it over once; a second mismatch is the server's.
      await rm(local, { force: true });
      t.bytesDone -= size;
      if (restarted)
        throw new DownloadError(
          file.path,
          `SHA-256 is ${digest}, the server listed ${file.sha256}; the file was removed`,
        );
      restarted = true;
      size = 0;
      hash = undefined;
      continue;
    }
    t.report(file.path, attempt);
    const fh = await open(local, 'a');
    try {
      const req = { jobId: t.jobId, path: file.path, offset: BigInt(size) };
      const call = t.patch
        ? conn.downloads.downloadPatch(req, conn.metadata(), {})
        : conn.downloads.download(req, conn.metadata(), {});
      for await (const chunk of readStream(call, scope.signal)) {
        if (chunk.path !== file.path)
          throw new DownloadError(file.path, `the server sent a chunk of ${JSON.stringify(chunk.path)} instead`);
        if (chunk.offset !== BigInt(size))
          throw new DownloadError(file.path, `chunk at byte ${chunk.offset}, expected byte ${size}`);
        if (size + chunk.data.length > file.size)
          throw new DownloadError(file.path, `more than the ${file.size} bytes listed`);
        if (crc32c(chunk.data) !== chunk.crc32c)
          throw new CorruptChunkError(`${file.path}: chunk at byte ${size} does not match its CRC-32C`);
        await fh.write(chunk.data);
        hash.update(chunk.data);
        size += chunk.data.length;
        t.bytesDone += chunk.data.length;
        t.bytesDownloaded += chunk.data.length;
        backoff.reset();
        t.report(file.path, attempt);
      }
      if (size !== file.size) throw new ShortStreamError(`${file.path}: stream ended at byte ${size} of ${file.size}`);
      await fh.sync();
    } catch (err) {
      const e = DppaRpcError.from(scope.reason(err), 'Download');
      if (scope.signal.aborted || !(isTransient(e) || e instanceof CorruptChunkError || e instanceof ShortStreamError))
        throw e;
      try {
        await backoff.failed(e, scope.signal);
      } catch (last) {
        throw last instanceof CorruptChunkError || last instanceof ShortStreamError
          ? new DownloadError(file.path, last.message, { cause: last })
          : last;
      }
      // What reached the disk before the failure stays; the next attempt asks for the rest.
      const onDisk = await sizeOnDisk(local);
      if (onDisk !== size) {
        await truncate(local, size);
      }
    } finally {
      await fh.close();
    }
  }
}

/**
 * Downloads a merged checkpoint, its merged patch, or the patch applied to a local base (see {@link DppaClient.pull}).
 * @throws RangeError when `out` exists or `patch` and `base` are both given; DownloadError, DppaRpcError, the signal's reason;
 *   with `base`, FormatError (PatchBaseMismatchError for a patch of another base) when the patch does not apply.
 */
export async function pull(conn: Connection, o: PullOptions, call: PullCallOptions = {}): Promise<PullResult> {
  const scope = new CallScope('Download', call);
  try {
    if (o.out === '') throw new RangeError('out: required');
    if (o.patch === true && o.base !== undefined)
      throw new RangeError('patch and base: give one (base downloads the patch and applies it)');
    if (await exists(o.out))
      throw new RangeError(
        `out: ${o.out} already exists; pull creates a new ${o.patch === true ? 'file' : 'folder'} and never writes into one`,
      );
    // A local base that is not the job's is refused before a byte of the patch is downloaded.
    if (o.base !== undefined) await checkBase(conn, o.jobId, o.base, scope);
    const patch = o.patch === true || o.base !== undefined;
    const list = patch
      ? await inScope(conn, 'ListPatch', conn.downloads.listPatch.bind(conn.downloads), { jobId: o.jobId }, scope, true)
      : await inScope(
          conn,
          'ListFiles',
          conn.downloads.listFiles.bind(conn.downloads),
          { jobId: o.jobId },
          scope,
          true,
        );
    const files = list.files.map(listedFile);
    const names = new Set(files.map((f) => f.path));
    if (names.size !== files.length) throw new DownloadError(o.out, 'the server listed a file twice');
    if (files.length === 0)
      throw new DownloadError(
        o.out,
        `job ${o.jobId} has no merged files (its merge.output may be the patch only: pull it with --patch or --base)`,
      );
    if (patch && files.length !== 1)
      throw new DownloadError(o.out, `the server listed ${files.length} files for the merged patch, not one`);
    const tmp = `${resolve(o.out)}.tmp-${o.jobId.replace(/[^A-Za-z0-9_-]/g, '_')}${patch ? '.patch' : ''}`;
    await mkdir(tmp, { recursive: true });
    await removeStrays(tmp, names);
    const bytesTotal = files.reduce((a, f) => a + f.size, 0);
    let filesDone = 0;
    const t: Transfer = {
      conn,
      patch,
      jobId: o.jobId,
      scope,
      bytesDone: 0,
      bytesDownloaded: 0,
      report: (file, attempt) =>
        call.onProgress?.({ file, filesDone, filesTotal: files.length, bytesDone: t.bytesDone, bytesTotal, attempt }),
    };
    for (const file of files) {
      await downloadFile(t, file, join(tmp, ...file.path.split('/')));
      filesDone++;
      t.report(file.path, 1);
    }
    // Every byte not received by this run was on disk already (and verified).
    const result = {
      out: o.out,
      files,
      bytesDownloaded: t.bytesDownloaded,
      bytesResumed: Math.max(0, bytesTotal - t.bytesDownloaded),
    };
    if (o.base !== undefined)
      return { ...result, applied: await applyDownloaded(o.base, join(tmp, files[0]!.path), tmp, o.out, scope.signal) };
    await rename(o.patch === true ? join(tmp, files[0]!.path) : tmp, o.out);
    if (o.patch === true) await rm(tmp, { recursive: true, force: true });
    await syncFolder(dirname(resolve(o.out)));
    return result;
  } catch (err) {
    throw scope.reason(err);
  } finally {
    scope.dispose();
  }
}

/**
 * Compares the local base's fingerprint with the job's (GetJob), so that a base
 * other than the job's is refused before the patch is downloaded. The patch's
 * own fingerprint is checked again when it is applied.
 * @throws PatchBaseMismatchError if the fingerprints differ.
 */
async function checkBase(conn: Connection, jobId: string, base: string, scope: CallScope): Promise<void> {
  const job = await inScope(conn, 'GetJob', conn.jobs.getJob.bind(conn.jobs), { jobId }, scope, true);
  if (job.baseFingerprint === '') return;
  const checkpoint = await Checkpoint.open(base);
  let fp: string;
  try {
    fp = await baseFingerprint(checkpoint, { signal: scope.signal });
  } finally {
    await checkpoint.close();
  }
  if (fp !== job.baseFingerprint)
    throw new PatchBaseMismatchError(
      `the patch is for another base: job ${jobId}'s base has fingerprint ${job.baseFingerprint}, ${base} has ${fp}`,
    );
}

/**
 * Applies a downloaded patch, then removes the download. A patch that does not
 * apply (damaged, or for another base) is removed too: nothing of it is kept.
 */
async function applyDownloaded(
  base: string,
  patch: string,
  tmp: string,
  out: string,
  signal: AbortSignal,
): Promise<ApplyPatchReport> {
  try {
    const applied = await applyPatch({ base, patch, out, signal });
    await rm(tmp, { recursive: true, force: true });
    return applied;
  } catch (err) {
    if (err instanceof FormatError) await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
