/**
 * Typed errors of the server; `rpc/status.ts` maps them to gRPC codes in one place. See docs/design/errors.md.
 */

/** The call carries no credentials, or credentials the server does not know (UNAUTHENTICATED). */
export class UnauthenticatedError extends Error {
  override name = 'UnauthenticatedError';
}

/** The caller is known but may not do this (PERMISSION_DENIED). */
export class PermissionDeniedError extends Error {
  override name = 'PermissionDeniedError';
}

/** A request field is malformed whatever the server's state (INVALID_ARGUMENT). */
export class InvalidArgumentError extends Error {
  override name = 'InvalidArgumentError';
}

/** The request does not fit the state of the job or of the server (FAILED_PRECONDITION). */
export class FailedPreconditionError extends Error {
  override name = 'FailedPreconditionError';
}

/** A size or count limit was reached (RESOURCE_EXHAUSTED). */
export class ResourceExhaustedError extends Error {
  override name = 'ResourceExhaustedError';
}

/** The job or file named does not exist (NOT_FOUND). */
export class NotFoundError extends Error {
  override name = 'NotFoundError';
}

/** The thing the call would open is already open elsewhere, e.g. a second upload stream of one party (ALREADY_EXISTS). */
export class AlreadyExistsError extends Error {
  override name = 'AlreadyExistsError';
}

/** The call lost to a concurrent one, e.g. an upload stream taken over by a newer stream of the same party (ABORTED). */
export class AbortedError extends Error {
  override name = 'AbortedError';
}

/** A byte offset past the end of a file (OUT_OF_RANGE). */
export class OutOfRangeError extends Error {
  override name = 'OutOfRangeError';
}

/** A feature the schema describes that this server does not offer yet (UNIMPLEMENTED). */
export class UnimplementedError extends Error {
  override name = 'UnimplementedError';
}

/** The server is shutting down or the call was cut off; retrying later may work (UNAVAILABLE). */
export class UnavailableError extends Error {
  override name = 'UnavailableError';
}

/** A server option is missing or invalid; the message names the option. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** The caller cancelled the call (CANCELLED; the caller no longer listens, but metrics count it). */
export class CancelledError extends Error {
  override name = 'CancelledError';
}

/** The call's deadline passed before it finished (DEADLINE_EXCEEDED). */
export class DeadlineExceededError extends Error {
  override name = 'DeadlineExceededError';
}

/**
 * NATS cannot be reached, or refuses what the server needs (JetStream, a
 * stream, a bucket): at start the server does not start; during a call it
 * fails with UNAVAILABLE, and retrying once NATS is back works.
 */
export class NatsUnavailableError extends Error {
  override name = 'NatsUnavailableError';
}

/**
 * The job's base could not be read while checking an upload against it (truncated or damaged on the server after
 * the job began): the server's fault, not the caller's (INTERNAL; the log has the cause).
 */
export class BaseReadError extends Error {
  override name = 'BaseReadError';
  constructor(tensor: string | undefined, cause: unknown) {
    const what = tensor === undefined ? "the job's base" : `tensor "${tensor}" of the job's base`;
    super(`the server could not read ${what} (the server log has the details)`, { cause });
  }

  /** `err` as the failure to read the base: a storage failure keeps its own status (storageError), others wrap. */
  static of(tensor: string | undefined, err: unknown): unknown {
    return storageError(err) !== undefined ? err : new BaseReadError(tensor, err);
  }
}

/** The disk (or quota) of the data folder is full: RESOURCE_EXHAUSTED, and retrying once the operator freed space works. */
export class DiskFullError extends ResourceExhaustedError {
  override name = 'DiskFullError';
}

/** The data folder's storage failed in a way that may pass (an I/O error, too many open files): UNAVAILABLE, retry later. */
export class StorageUnavailableError extends UnavailableError {
  override name = 'StorageUnavailableError';
}

/** Error codes of the file system meaning "no room": ENOSPC (disk full), EDQUOT (quota reached). */
const FULL_CODES = new Set(['ENOSPC', 'EDQUOT']);

/**
 * Error codes of the file system that are no fault of the caller's and may
 * pass: I/O errors, too many open files, a busy or read-only (remounted after
 * errors) device, a stale handle of a shared folder.
 */
const PASSING_CODES = new Set(['EIO', 'EMFILE', 'ENFILE', 'EAGAIN', 'EBUSY', 'EROFS', 'ESTALE']);

/**
 * The typed error of a storage failure: `err` (or an error in its `cause`
 * chain) carries a file system code of {@link FULL_CODES} or
 * {@link PASSING_CODES}. Its message says what failed without the server's
 * paths; the original is its cause. Undefined for any other error.
 */
export function storageError(err: unknown): DiskFullError | StorageUnavailableError | undefined {
  if (err instanceof DiskFullError || err instanceof StorageUnavailableError) return err;
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as NodeJS.ErrnoException).code;
    if (typeof code !== 'string') continue;
    if (FULL_CODES.has(code))
      return new DiskFullError(`no space left on the server's disk (${code}); retry once space is freed`, {
        cause: err,
      });
    if (PASSING_CODES.has(code))
      return new StorageUnavailableError(`the server's storage failed (${code}); retry later`, { cause: err });
  }
  return undefined;
}
