/**
 * Typed errors of the client SDK, each saying what a person can do about it. See docs/design/errors.md.
 */
import { Metadata, status as Status, type ServiceError } from '@grpc/grpc-js';
import type { UploadState } from '../../proto/gen/dppa/v1/upload.js';
import type { EvaluationCandidate } from './evaluate.js';

/** The name of a gRPC status code, e.g. `NOT_FOUND`. */
export function statusName(code: number): string {
  return (Status as unknown as Record<number, string | undefined>)[code] ?? `code ${code}`;
}

/** True for the error objects grpc-js hands to callbacks and streams. */
export function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === 'number' &&
    typeof (err as Partial<ServiceError>).details === 'string' &&
    (err as Partial<ServiceError>).metadata instanceof Metadata
  );
}

/** Options of {@link DppaRpcError}. */
export interface DppaRpcErrorOptions extends ErrorOptions {
  /** Trailing metadata sent with the status, if any. */
  metadata?: Metadata | undefined;
}

/**
 * The server (or the connection to it) ended a call with a non-OK gRPC status.
 *
 * The message reads `GetJob failed: job "x" not found (NOT_FOUND)`: the RPC,
 * the server's own text, and the status name.
 */
export class DppaRpcError extends Error {
  override name = 'DppaRpcError';
  /** The gRPC status code (`status.NOT_FOUND`, …). */
  readonly code: Status;
  /** The status name, e.g. `NOT_FOUND`. */
  readonly codeName: string;
  /** The server's text for the status (or grpc-js's, for connection failures). */
  readonly details: string;
  /** The RPC that failed, e.g. `GetJob`. */
  readonly method: string;
  /** Trailing metadata of the status; empty when there was none. */
  readonly metadata: Metadata;

  constructor(method: string, code: Status, details: string, opts: DppaRpcErrorOptions = {}) {
    super(`${method} failed: ${details === '' ? statusName(code).toLowerCase() : details} (${statusName(code)})`, {
      cause: opts.cause,
    });
    this.method = method;
    this.code = code;
    this.codeName = statusName(code);
    this.details = details;
    this.metadata = opts.metadata ?? new Metadata();
  }

  /**
   * Wraps a grpc-js error of the call `method`; returns any other value
   * (already typed errors, bugs) unchanged.
   */
  static from(err: unknown, method: string): unknown {
    if (err instanceof DppaRpcError || !isServiceError(err)) return err;
    return new DppaRpcError(method, err.code, err.details, { cause: err, metadata: err.metadata });
  }
}

/**
 * The delta does not fit the job: made against another base, at another rate
 * or with another method than the job requires. Nothing was uploaded.
 */
export class DeltaMismatchError extends Error {
  override name = 'DeltaMismatchError';
  /** What differs: `baseFingerprint`, `rate` or `method`. */
  readonly field: string;
  /** The job's value. */
  readonly expected: string;
  /** The delta's (or the caller's) value. */
  readonly actual: string;

  constructor(field: string, expected: string, actual: string, message: string, opts: ErrorOptions = {}) {
    super(message, opts);
    this.field = field;
    this.expected = expected;
    this.actual = actual;
  }
}

/** The job is in a state that does not allow the operation (e.g. a push to a failed job). */
export class JobStateError extends Error {
  override name = 'JobStateError';
  /** Id of the job. */
  readonly jobId: string;
  /** The job's state, lower-case (`failed`, `merged`, …). */
  readonly state: string;

  constructor(jobId: string, state: string, message: string, opts: ErrorOptions = {}) {
    super(message, opts);
    this.jobId = jobId;
    this.state = state;
  }
}

/** Every record was sent and accepted, yet the server does not count the upload as complete. */
export class UploadIncompleteError extends Error {
  override name = 'UploadIncompleteError';
  /** The server's view of the upload after the last attempt. */
  readonly state: UploadState;

  constructor(state: UploadState, opts: ErrorOptions = {}) {
    super(
      `upload of party "${state.party}" to job ${state.jobId} ended incomplete: the server holds ` +
        `${state.tensorsReceived.length} of ${state.tensorsExpected} tensors although every tensor was sent`,
      opts,
    );
    this.state = state;
  }
}

/**
 * A downloaded file is not what the server's file list promised (checksum,
 * size, or a path that would leave the output folder), even after retrying.
 * Nothing was written to the output folder.
 */
export class DownloadError extends Error {
  override name = 'DownloadError';
  /** The file concerned, as listed by the server. */
  readonly file: string;

  constructor(file: string, message: string, opts: ErrorOptions = {}) {
    super(`${file}: ${message}`, opts);
    this.file = file;
  }
}

/**
 * The party's evaluation of a DPA candidate failed (building it, or the
 * `evaluate` callback), on every attempt. The message was sent to the server,
 * which stops this party's search with it; the job and the other parties'
 * work are kept, and evaluating again resumes the search.
 */
export class EvaluationError extends Error {
  override name = 'EvaluationError';
  /** The candidate that could not be evaluated. */
  readonly candidate: EvaluationCandidate;

  constructor(candidate: EvaluationCandidate, message: string, opts: ErrorOptions = {}) {
    super(message, opts);
    this.candidate = candidate;
  }
}
