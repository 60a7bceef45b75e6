/** {@link DppaClient}: the SDK's handle on one aggregation server. */
import type { Job, JobEvent } from '../../proto/gen/dppa/v1/jobs.js';
import type { MergedFile } from '../../proto/gen/dppa/v1/download.js';
import type { UploadState } from '../../proto/gen/dppa/v1/upload.js';
import { unary, type CallOptions } from './call.js';
import { Connection, type DppaClientOptions } from './connection.js';
import { evaluate, type EvaluateCallOptions, type EvaluateOptions, type EvaluateResult } from './evaluate.js';
import {
  cancelJob,
  createJob,
  getJob,
  listJobs,
  resumeJob,
  watchJob,
  type CreateJobOptions,
  type CreateJobResult,
  type WatchJobOptions,
} from './jobs.js';
import { pull, type PullCallOptions, type PullOptions, type PullResult } from './pull.js';
import { push, type PushCallOptions, type PushOptions } from './push.js';

/**
 * A client of one aggregation server: jobs (admin token), uploads (a party's
 * token), downloads (either). One gRPC connection serves every call; close it
 * with {@link DppaClient.close}.
 *
 * Every call sends `authorization: Bearer <token>`. Calls that change nothing
 * (and uploads and downloads, which resume) are retried on UNAVAILABLE and
 * dropped streams with exponential backoff; `createJob` and `cancelJob` are
 * not, since a repeat could act twice. Failures are typed: {@link DppaRpcError}
 * for a gRPC status, RangeError for bad options, the signal's reason on abort.
 *
 * @example
 * ```ts
 * const admin = new DppaClient({ address: 'localhost:50051', token: adminToken });
 * const { job, tokens } = await admin.createJob({ basePath: '/srv/llama', parties: ['math', 'law'], rate: 0.9 });
 * ```
 */
export class DppaClient {
  private readonly conn: Connection;

  /**
   * Checks the options and prepares the connection (it opens on the first call).
   * @throws RangeError naming the option that is wrong, including plaintext to an
   *   address that is not loopback without `insecure`.
   */
  constructor(options: DppaClientOptions) {
    this.conn = new Connection(options);
  }

  /** The server's `host:port`. */
  get address(): string {
    return this.conn.options.address;
  }

  /**
   * Creates a job (admin token). Not retried.
   * @returns The job, in state COLLECTING, and one bearer token per party (shown only here).
   * @throws RangeError for bad settings (naming the field), DppaRpcError.
   */
  createJob(request: CreateJobOptions, opts?: CallOptions): Promise<CreateJobResult> {
    return createJob(this.conn, request, opts);
  }

  /**
   * The job as it is now (admin token, or a party token of the job).
   * @throws DppaRpcError (NOT_FOUND for an unknown id).
   */
  getJob(jobId: string, opts?: CallOptions): Promise<Job> {
    return getJob(this.conn, jobId, opts);
  }

  /**
   * Every job on the server, newest first (admin token).
   * @throws DppaRpcError.
   */
  listJobs(opts?: CallOptions): Promise<Job[]> {
    return listJobs(this.conn, opts);
  }

  /**
   * The events of a job after `afterSeq`: past ones first, then live ones,
   * until the job merges or fails. Reconnects after a dropped stream from the
   * last event seen. Breaking out of the loop, or aborting `signal`, cancels
   * the call.
   * @throws DppaRpcError (while iterating), the signal's reason.
   */
  watchJob(jobId: string, opts?: WatchJobOptions): AsyncGenerator<JobEvent, void, undefined> {
    return watchJob(this.conn, jobId, opts);
  }

  /**
   * Fails a job that has not merged yet (admin token). Not retried.
   * @param reason - Becomes the job's `failureReason`.
   * @throws DppaRpcError (FAILED_PRECONDITION for a merged job, typically).
   */
  cancelJob(jobId: string, reason: string, opts?: CallOptions): Promise<Job> {
    return cancelJob(this.conn, jobId, reason, opts);
  }

  /**
   * Tries a job paused by a storage failure on the server (`job.pause` set:
   * its disk was full, say, and has been freed) again at once instead of at
   * its next automatic attempt (admin token). A job that is not paused and
   * has not ended is looked at again.
   * @returns The job as it is then.
   * @throws DppaRpcError (FAILED_PRECONDITION once the job has merged or failed).
   */
  resumeJob(jobId: string, opts?: CallOptions): Promise<Job> {
    return resumeJob(this.conn, jobId, opts);
  }

  /**
   * What the server holds of a party's upload (the party's token).
   * @throws DppaRpcError.
   */
  getUploadState(jobId: string, party: string, opts?: CallOptions): Promise<UploadState> {
    return unary(
      this.conn,
      'GetUploadState',
      this.conn.uploads.getUploadState.bind(this.conn.uploads),
      { jobId, party },
      opts ?? {},
      true,
    );
  }

  /**
   * Uploads a party's delta (the party's token): pruned on the fly from
   * `base` and `finetuned` at the job's rate and method, or read from a
   * `.dppa` file. Sends only the tensors the server does not hold yet, with
   * backpressure; after UNAVAILABLE or a dropped stream it asks the server
   * again and sends the rest, giving up after `retry.attempts` failures in a
   * row that brought no new tensor to the server.
   * @returns The server's final UploadState (`complete` is true).
   * @throws DeltaMismatchError (other base, rate or method than the job's),
   *   JobStateError (the job no longer collects), UploadIncompleteError,
   *   DppaRpcError, FormatError/CheckpointMismatchError for bad input, the signal's reason.
   */
  push(options: PushOptions, opts?: PushCallOptions): Promise<UploadState> {
    return push(this.conn, options, opts);
  }

  /**
   * Serves this party's evaluation requests of a job whose DPA search uses the
   * remote evaluator (the party's token). For each request it builds the
   * candidate (the dense reference is `finetuned` as it is; an amplified
   * candidate is `base` + the amplified `delta`, written to
   * `workDir/candidate`), calls `evaluate` and answers with its scores. It may
   * be started before the job leaves COLLECTING; it waits for requests. After
   * a dropped stream it reconnects with backoff, without limit (the server's
   * `party_timeout_seconds` decides how long the search waits), and a result the
   * server did not receive is sent again rather than computed again.
   * @returns When the party's search is over (the server ends the stream).
   * @throws EvaluationError when building or scoring a candidate failed on every attempt (the server was told and
   *   stopped this party's search; evaluating again resumes it),
   *   DppaRpcError (FAILED_PRECONDITION when the job failed or does not search with this party's evaluations),
   *   DeltaMismatchError or FormatError when `delta` does not fit the job (checked before anything is evaluated),
   *   RangeError for bad options, the signal's reason.
   */
  evaluate(options: EvaluateOptions, opts?: EvaluateCallOptions): Promise<EvaluateResult> {
    return evaluate(this.conn, options, opts);
  }

  /**
   * The files of a merged job's checkpoint (admin token, or a party token if the job allows).
   * @throws DppaRpcError.
   */
  async listFiles(jobId: string, opts?: CallOptions): Promise<MergedFile[]> {
    const res = await unary(
      this.conn,
      'ListFiles',
      this.conn.downloads.listFiles.bind(this.conn.downloads),
      { jobId },
      opts ?? {},
      true,
    );
    return res.files;
  }

  /**
   * Downloads a merged job's checkpoint into the new folder `out`, checking
   * every chunk's CRC-32C and every file's SHA-256, resuming after a dropped
   * stream. `out` appears only once complete. With `patch`, downloads the
   * merged patch as the file `out`; with `base`, downloads the patch and
   * applies it to that local base, writing the merged checkpoint at `out`.
   * @throws RangeError when `out` exists, DownloadError, DppaRpcError, the signal's reason;
   *   with `base`, FormatError (PatchBaseMismatchError) when the patch is damaged or for another base.
   */
  pull(options: PullOptions, opts?: PullCallOptions): Promise<PullResult> {
    return pull(this.conn, options, opts);
  }

  /** Closes the connection; calls in flight fail. Idempotent. */
  close(): void {
    this.conn.close();
  }
}
