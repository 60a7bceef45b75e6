/**
 * DownloadService: the merged checkpoint (and merged patch) of a MERGED job, file by file, in checksummed chunks from any offset; only
 * files recorded in the job can be named. See docs/design/rpc.md.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import type { Metadata } from '@grpc/grpc-js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import type { DownloadServiceServer, FileChunk } from '../../proto/gen/dppa/v1/download.js';
import { crc32c } from '../../proto/sparse/index.js';
import { FailedPreconditionError, NotFoundError, OutOfRangeError, PermissionDeniedError } from '../errors.js';
import { stateName, type JobStore, type MergedFileInfo, type StoredJob } from '../jobs/job-store.js';
import type { Authenticator } from './auth.js';
import type { RpcWrapper } from './handler.js';

/** Largest `data` of one FileChunk. */
export const DOWNLOAD_CHUNK_BYTES = 1024 * 1024;

/** What the download service needs. */
export interface DownloadServiceDeps {
  store: JobStore;
  auth: Authenticator;
}

/** The DownloadService implementation. */
export function downloadService(deps: DownloadServiceDeps, rpc: RpcWrapper): DownloadServiceServer {
  /** The merged job, if the caller may download it. */
  const mergedJob = (metadata: Metadata, jobId: string): StoredJob & { merged: { files: MergedFileInfo[] } } => {
    const caller = deps.auth.requireJobAccess(metadata, jobId);
    const job = deps.store.get(jobId);
    if (caller.kind === 'party' && !job.merge.partiesMayDownload) {
      throw new PermissionDeniedError(
        `job ${jobId} does not let parties download the merged checkpoint (merge.parties_may_download)`,
      );
    }
    if (job.state !== JobState.JOB_STATE_MERGED || job.merged === undefined) {
      throw new FailedPreconditionError(
        `job ${jobId} is ${stateName(job.state)}: the merged checkpoint exists once it is MERGED`,
      );
    }
    return job as StoredJob & { merged: { files: MergedFileInfo[] } };
  };

  return {
    listFiles: rpc.unary('dppa.v1.DownloadService/ListFiles', (req, ctx) => {
      const job = mergedJob(ctx.metadata, req.jobId);
      return Promise.resolve({
        files: job.merged.files.map((f) => ({ path: f.path, size: BigInt(f.size), sha256: f.sha256 })),
      });
    }),
    download: rpc.serverStream('dppa.v1.DownloadService/Download', async (req, send, ctx) => {
      const job = mergedJob(ctx.metadata, req.jobId);
      const file = job.merged.files.find((f) => f.path === req.path);
      if (file === undefined)
        throw new NotFoundError(`job ${req.jobId} has no file ${JSON.stringify(req.path)} (ListFiles names them)`);
      await sendFile(join(deps.store.dir(job.id), 'merged', file.path), file, req.offset, send, ctx.signal);
    }),
    listPatch: rpc.unary('dppa.v1.DownloadService/ListPatch', (req, ctx) => {
      const f = mergedPatch(mergedJob(ctx.metadata, req.jobId));
      return Promise.resolve({ files: [{ path: f.path, size: BigInt(f.size), sha256: f.sha256 }] });
    }),
    downloadPatch: rpc.serverStream('dppa.v1.DownloadService/DownloadPatch', async (req, send, ctx) => {
      const job = mergedJob(ctx.metadata, req.jobId);
      const file = mergedPatch(job);
      if (file.path !== req.path)
        throw new NotFoundError(`job ${req.jobId} has no patch ${JSON.stringify(req.path)} (ListPatch names it)`);
      await sendFile(join(deps.store.dir(job.id), file.path), file, req.offset, send, ctx.signal);
    }),
  };
}

/** The job's merged patch. @throws FailedPreconditionError if its merge wrote none. */
function mergedPatch(job: StoredJob): MergedFileInfo {
  const patch = job.merged?.patch;
  if (patch === undefined)
    throw new FailedPreconditionError(
      `job ${job.id} has no merged patch: its merge.output wrote the dense checkpoint only`,
    );
  return patch;
}

/** Sends a recorded file from `offset` to its end in checksummed chunks. */
async function sendFile(
  path: string,
  file: MergedFileInfo,
  from: bigint,
  send: (c: FileChunk) => Promise<void>,
  signal: AbortSignal,
): Promise<void> {
  if (from > BigInt(file.size))
    throw new OutOfRangeError(`offset ${from} is past the end of ${file.path} (${file.size} bytes)`);
  const fh = await open(path, 'r');
  try {
    for (let offset = Number(from); offset < file.size;) {
      signal.throwIfAborted();
      // A fresh buffer per chunk: the transport may still hold the previous one.
      const data = Buffer.allocUnsafe(Math.min(DOWNLOAD_CHUNK_BYTES, file.size - offset));
      const { bytesRead } = await fh.read(data, 0, data.length, offset);
      if (bytesRead === 0) throw new Error(`${file.path} is shorter on disk than the ${file.size} bytes recorded`);
      const chunk = data.subarray(0, bytesRead);
      await send({ path: file.path, offset: BigInt(offset), data: chunk, crc32c: crc32c(chunk) });
      offset += bytesRead;
    }
  } finally {
    await fh.close();
  }
}
