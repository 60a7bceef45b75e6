/**
 * Calls to NATS as the cluster makes them: a revision conflict is told apart
 * (the caller reads again and retries); any other failure means NATS is away
 * or refusing, and becomes a {@link NatsUnavailableError} (UNAVAILABLE to a
 * gRPC caller).
 */
import { JetStreamApiCodes, JetStreamApiError } from '@nats-io/jetstream';
import { NatsUnavailableError } from '../errors.js';
import { describeNatsError } from '../nats/connection.js';

/** Attempts of a read-modify-write before a conflict is given up on (many replicas changing one key at once). */
export const MAX_CONFLICT_RETRIES = 100;

/**
 * True when a KV update or create failed because the key changed since it was
 * read (or exists). A clustered JetStream may answer 10164 ("wrong last
 * sequence: unknown") instead of 10071, and @nats-io/kv treats both as a conflict.
 */
export function isRevisionConflict(err: unknown): boolean {
  return (
    err instanceof JetStreamApiError &&
    (err.code === JetStreamApiCodes.StreamWrongLastSequence ||
      err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown)
  );
}

/**
 * Runs a NATS call; a revision conflict is rethrown as is, any other error
 * as a NatsUnavailableError saying what was being done.
 */
export async function natsCall<T>(what: string, call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    if (isRevisionConflict(err) || err instanceof NatsUnavailableError) throw err;
    throw new NatsUnavailableError(`NATS is unavailable (${what}): ${describeNatsError(err)}`, { cause: err });
  }
}
