/**
 * Connecting to NATS, the one way both the event publisher and the cluster
 * do it: the URL and credentials of {@link NatsOptions}, a bounded first
 * attempt (so that a server that cannot reach NATS does not start), then
 * reconnection forever.
 */
import { readFile } from 'node:fs/promises';
import { connect, credsAuthenticator, type NatsConnection } from '@nats-io/transport-node';
import { natsServers, redactUrl, type NatsOptions } from '../config.js';
import { ConfigError, NatsUnavailableError } from '../errors.js';
import { messageOf } from '../../proto/errors.js';

/** How long the first connection may take. */
const CONNECT_TIMEOUT_MS = 5000;

/**
 * Connects to NATS.
 * @param name - Client name NATS shows for the connection.
 * @throws NatsUnavailableError naming the URL if NATS cannot be reached.
 * @throws ConfigError if the credentials file cannot be read.
 */
export async function connectNats(opts: NatsOptions, name: string): Promise<NatsConnection> {
  let creds: Uint8Array | undefined;
  if (opts.credsFile !== undefined) {
    try {
      creds = await readFile(opts.credsFile);
    } catch (cause) {
      throw new ConfigError(`nats.credsFile: cannot read ${opts.credsFile}: ${messageOf(cause)}`, { cause });
    }
  }
  try {
    return await connect({
      servers: natsServers(opts.url),
      name,
      timeout: CONNECT_TIMEOUT_MS,
      // Once connected, never give up: the server waits for NATS however long it is away.
      maxReconnectAttempts: -1,
      reconnectTimeWait: 1000,
      ...(creds === undefined ? {} : { authenticator: credsAuthenticator(creds) }),
    });
  } catch (cause) {
    throw new NatsUnavailableError(
      `cannot connect to NATS at ${redactUrl(opts.url)}: ${redactUrl(describeNatsError(cause))}`,
      { cause },
    );
  }
}

/** An error from nats.js as one line: its message, and the system error under it when that says more. */
export function describeNatsError(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  // nats.js wraps socket errors ("connection refused") around the system error (ECONNREFUSED…): show both.
  return err.cause instanceof Error && err.cause.message !== err.message
    ? `${err.message} (${err.cause.message})`
    : err.message;
}
