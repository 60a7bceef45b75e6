/**
 * The one place where errors become gRPC statuses. Handlers throw; the
 * wrapper in handler.ts calls {@link toStatus}. Unknown errors become
 * INTERNAL with a generic message and a reference; their text goes to the
 * log only, never to the caller.
 */
import { randomBytes } from 'node:crypto';
import { status as Code } from '@grpc/grpc-js';
import { ChecksumError, FormatError } from '../../proto/errors.js';
import {
  AbortedError,
  AlreadyExistsError,
  CancelledError,
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  NatsUnavailableError,
  NotFoundError,
  OutOfRangeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  UnauthenticatedError,
  UnavailableError,
  UnimplementedError,
} from '../errors.js';
import type { Logger } from '../log.js';

/** A gRPC status: code and the message sent to the caller. */
export interface RpcStatus {
  code: Code;
  details: string;
}

/** Error classes and their codes; the first match wins, so subclasses come before their parents. */
const CODES: [new (...args: never[]) => Error, Code][] = [
  [UnauthenticatedError, Code.UNAUTHENTICATED],
  [PermissionDeniedError, Code.PERMISSION_DENIED],
  [InvalidArgumentError, Code.INVALID_ARGUMENT],
  [FailedPreconditionError, Code.FAILED_PRECONDITION],
  [ResourceExhaustedError, Code.RESOURCE_EXHAUSTED],
  [NotFoundError, Code.NOT_FOUND],
  [AlreadyExistsError, Code.ALREADY_EXISTS],
  [AbortedError, Code.ABORTED],
  [OutOfRangeError, Code.OUT_OF_RANGE],
  [UnimplementedError, Code.UNIMPLEMENTED],
  [UnavailableError, Code.UNAVAILABLE],
  // With --cluster, calls that need NATS while it is away: retry later.
  [NatsUnavailableError, Code.UNAVAILABLE],
  [CancelledError, Code.CANCELLED],
  [DeadlineExceededError, Code.DEADLINE_EXCEEDED],
  // Damaged bytes from a caller: the checksum says so. Any other malformed input is the caller's argument.
  [ChecksumError, Code.DATA_LOSS],
  [FormatError, Code.INVALID_ARGUMENT],
];

/**
 * The status for an error thrown by a handler.
 * @param log - Receives unknown errors with their stack and the reference sent to the caller.
 */
export function toStatus(err: unknown, log: Logger): RpcStatus {
  if (err instanceof Error) {
    for (const [cls, code] of CODES) if (err instanceof cls) return { code, details: err.message };
  }
  const reference = randomBytes(4).toString('hex');
  log.error('internal error', { reference, err: err instanceof Error ? err : String(err) });
  return { code: Code.INTERNAL, details: `internal error (reference ${reference}; the server log has the details)` };
}

/** Name of a status code for metric labels, e.g. `INVALID_ARGUMENT`. */
export function codeName(code: Code): string {
  return Code[code] ?? String(code);
}
