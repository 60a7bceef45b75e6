/**
 * Typed errors of the server. Domain code throws these; `rpc/status.ts` turns
 * them into gRPC status codes in one place, so no handler picks a code itself.
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
