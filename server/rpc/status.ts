/**
 * The one place where errors become gRPC statuses ({@link toStatus}); unknown errors become INTERNAL, their text
 * logged, never sent. See docs/design/errors.md.
 */
import { randomBytes } from 'node:crypto';
import { status as Code } from '@grpc/grpc-js';
import { ChecksumError, FormatError } from '../../proto/errors.js';
import {
  AbortedError,
  AlreadyExistsError,
  BaseReadError,
  CancelledError,
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  NatsUnavailableError,
  NotFoundError,
  OutOfRangeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  storageError,
  UnauthenticatedError,
  UnavailableError,
  UnimplementedError,
} from '../errors.js';
import type { Logger } from '../log.js';
import {
  DuplicateSubmissionError,
  FixedPointError,
  InconsistentSharesError,
  MaskedLengthError,
  ProtocolStateError,
  ShareAuthError,
  TooFewSurvivorsError,
} from '../../proto/secure/errors.js';

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
  // The server's copy of the base is damaged: nothing the caller can fix.
  [BaseReadError, Code.INTERNAL],
  // With --cluster, calls that need NATS while it is away: retry later.
  [NatsUnavailableError, Code.UNAVAILABLE],
  [CancelledError, Code.CANCELLED],
  [DeadlineExceededError, Code.DEADLINE_EXCEEDED],
  // Damaged bytes from a caller: the checksum says so. Any other malformed input is the caller's argument.
  [ChecksumError, Code.DATA_LOSS],
  [FormatError, Code.INVALID_ARGUMENT],
  // Secure aggregation (docs/privacy.md, "Errors").
  [DuplicateSubmissionError, Code.ALREADY_EXISTS],
  [MaskedLengthError, Code.INVALID_ARGUMENT],
  [ShareAuthError, Code.INVALID_ARGUMENT],
  [FixedPointError, Code.INVALID_ARGUMENT],
  [TooFewSurvivorsError, Code.FAILED_PRECONDITION],
  [InconsistentSharesError, Code.FAILED_PRECONDITION],
  [ProtocolStateError, Code.FAILED_PRECONDITION],
];

/**
 * The status for an error thrown by a handler.
 * @param log - Receives unknown errors with their stack and the reference sent to the caller.
 */
export function toStatus(err: unknown, log: Logger): RpcStatus {
  if (err instanceof BaseReadError) log.error('base read failure', { err });
  const known = typedStatus(err);
  if (known !== undefined) return known;
  const storage = storageError(err);
  if (storage !== undefined) {
    // The operator has something to do (free space, check the disk); the caller only learns the code.
    log.warn('storage failure', { err: err instanceof Error ? err : String(err) });
    return typedStatus(storage)!;
  }
  const reference = randomBytes(4).toString('hex');
  log.error('internal error', { reference, err: err instanceof Error ? err : String(err) });
  return { code: Code.INTERNAL, details: `internal error (reference ${reference}; the server log has the details)` };
}

function typedStatus(err: unknown): RpcStatus | undefined {
  if (!(err instanceof Error)) return undefined;
  for (const [cls, code] of CODES) if (err instanceof cls) return { code, details: err.message };
  return undefined;
}
