/**
 * Typed errors of the secure-aggregation protocol core. Each names what was
 * refused; the server maps them to gRPC codes in `server/errors.ts` when the
 * protocol is wired into its RPCs (see docs/privacy.md).
 */

/** Base class: anything the protocol refuses. */
export class SecureAggregationError extends Error {
  override name = 'SecureAggregationError';
}

/** A share box failed authentication: tampered, sealed for another job, round or recipient. */
export class ShareAuthError extends SecureAggregationError {
  override name = 'ShareAuthError';
  /** The party the box claims to come from. */
  readonly sender: number;
  constructor(sender: number, message: string, opts?: ErrorOptions) {
    super(`share from party ${sender}: ${message}`, opts);
    this.sender = sender;
  }
}

/** A party sent the same round's message twice. */
export class DuplicateSubmissionError extends SecureAggregationError {
  override name = 'DuplicateSubmissionError';
}

/** A masked vector does not have the union's length. */
export class MaskedLengthError extends SecureAggregationError {
  override name = 'MaskedLengthError';
}

/** Fewer parties than the threshold are left for a phase: the sum cannot be recovered. */
export class TooFewSurvivorsError extends SecureAggregationError {
  override name = 'TooFewSurvivorsError';
  readonly phase: string;
  readonly have: number;
  readonly needed: number;
  constructor(phase: string, have: number, needed: number) {
    super(`${phase}: ${have} parties left, the threshold is ${needed}`);
    this.phase = phase;
    this.have = have;
    this.needed = needed;
  }
}

/** A message that does not fit the protocol's current round or its roster (unknown party, wrong phase, bad size). */
export class ProtocolStateError extends SecureAggregationError {
  override name = 'ProtocolStateError';
}

/** Revealed shares disagree with each other or with a published key: a party sent a wrong share. */
export class InconsistentSharesError extends SecureAggregationError {
  override name = 'InconsistentSharesError';
}

/** A value cannot be encoded as fixed point (NaN), or fixed-point parameters are invalid. */
export class FixedPointError extends SecureAggregationError {
  override name = 'FixedPointError';
}
