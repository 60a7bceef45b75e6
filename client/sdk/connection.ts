/**
 * The connection to an aggregation server: options and their defaults, the
 * transport-security policy, one gRPC channel shared by every service client,
 * and the bearer token sent with every call.
 */
import { readFileSync } from 'node:fs';
import { BlockList, isIP } from 'node:net';
import { Channel, credentials, Metadata, type ChannelCredentials, type ChannelOptions } from '@grpc/grpc-js';
import { DownloadServiceClient } from '../../proto/gen/dppa/v1/download.js';
import { EvaluationServiceClient } from '../../proto/gen/dppa/v1/evaluation.js';
import { JobServiceClient } from '../../proto/gen/dppa/v1/jobs.js';
import { SecureAggregationServiceClient } from '../../proto/gen/dppa/v1/secure.js';
import type { UploadServiceClient } from '../../proto/gen/dppa/v1/upload.js';
import { UploadClientSendingRecords } from './upload-client.js';
import { Backoff, retryWithDefaults, type RetryNotice, type RetryOptions } from './retry.js';

/** A PEM file: its path, or its contents. */
export type PemSource = string | Uint8Array;

/** Transport security. Any `tls` object (even `{}`) turns TLS on. */
export interface TlsOptions {
  /** CA certificate(s) that signed the server's certificate. @default the CAs Node trusts */
  ca?: PemSource;
  /** Client certificate, for servers that require mutual TLS; needs `key`. @default none */
  cert?: PemSource;
  /** Private key of `cert`. @default none */
  key?: PemSource;
  /** Name to check the server's certificate against, when it is not the host of `address`. @default the host */
  serverName?: string;
}

/** Options of {@link DppaClient}. */
export interface DppaClientOptions {
  /** The server, as `host:port` (`[::1]:50051` for an IPv6 literal). */
  address: string;
  /** Bearer token sent with every call: the admin token, or a party's token from job creation. */
  token: string;
  /** Use TLS with these settings. @default plaintext (allowed only to a loopback address, or with `insecure`) */
  tls?: TlsOptions;
  /**
   * Allow plaintext to an address that is not loopback (127.0.0.0/8, ::1,
   * localhost). The token and the deltas then cross the network unencrypted.
   * @default false
   */
  insecure?: boolean;
  /**
   * Time limit of each attempt of a request (job calls, upload state, file
   * list), in ms; an attempt that gets no answer in time is retried like an
   * unreachable server. @default 30000
   */
  timeoutMs?: number;
  /**
   * Retrying of transient failures (UNAVAILABLE, an attempt's time limit, dropped
   * streams, an upload slot still held by an earlier stream), with exponential
   * backoff and jitter, for `forMs` from the first failure in a row.
   * @default { forMs: 300000, attempts: Infinity, initialDelayMs: 250, maxDelayMs: 10000 }
   */
  retry?: Partial<RetryOptions>;
  /** Told before each wait of a retry (what failed, how long the wait, how much of the budget is left). @default none */
  onRetry?: (notice: RetryNotice) => void;
  /** Largest gRPC message sent or received, in bytes. @default 33554432 (32 MiB; a delta record is at most 16 MiB) */
  maxMessageBytes?: number;
}

/** What reaching a server takes, without a token: {@link DppaClientOptions} less `token` and the retry options. */
export type TransportOptions = Omit<DppaClientOptions, 'token' | 'retry' | 'onRetry'>;

/** {@link TransportOptions} with every default filled in and the PEM files read. */
export interface ResolvedTransport {
  address: string;
  host: string;
  port: number;
  tls:
    | { ca: Buffer | undefined; cert: Buffer | undefined; key: Buffer | undefined; serverName: string | undefined }
    | undefined;
  insecure: boolean;
  timeoutMs: number;
  maxMessageBytes: number;
}

/** {@link DppaClientOptions} with every default filled in and the PEM files read. */
export interface ResolvedClientOptions extends ResolvedTransport {
  token: string;
  retry: RetryOptions;
  onRetry: ((notice: RetryNotice) => void) | undefined;
}

const loopback = new BlockList();
loopback.addSubnet('127.0.0.0', 8, 'ipv4');
loopback.addAddress('::1', 'ipv6');

/**
 * True for hosts that never leave the machine: `localhost`, 127.0.0.0/8 and
 * ::1 (also written in full, or as an IPv4-mapped IPv6 address).
 */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (h === 'localhost' || h === 'localhost.') return true;
  const family = isIP(h);
  if (family === 4) return loopback.check(h, 'ipv4');
  if (family === 6) return loopback.check(h, 'ipv6');
  return false;
}

/**
 * Splits `host:port` (or `[v6]:port`).
 * @throws RangeError naming `address` when it is not of that form.
 */
export function parseAddress(address: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.%\w-]+)\]|([^:[\]\s/]+)):(\d{1,5})$/.exec(address);
  const port = m === null ? NaN : Number(m[3]);
  if (m === null || !(port >= 1 && port <= 65535)) {
    throw new RangeError(
      `address: expected host:port (e.g. merge.example.org:50051 or [::1]:50051), got ${JSON.stringify(address)}`,
    );
  }
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined && isIP(host) !== 6)
    throw new RangeError(`address: ${JSON.stringify(host)} in brackets is not an IPv6 address`);
  return { host, port };
}

function readPem(source: PemSource | undefined, field: string): Buffer | undefined {
  if (source === undefined) return undefined;
  if (typeof source !== 'string') return Buffer.from(source);
  try {
    return readFileSync(source);
  } catch (cause) {
    throw new RangeError(`${field}: cannot read ${JSON.stringify(source)}: ${(cause as Error).message}`, { cause });
  }
}

/**
 * Fills in defaults, reads the PEM files and applies the transport policy.
 * @throws RangeError naming the option that is wrong, including plaintext to
 *   an address that is not loopback without `insecure`.
 */
export function withDefaults(o: DppaClientOptions): ResolvedClientOptions {
  const transport = transportDefaults(o);
  if (typeof o.token !== 'string' || o.token === '')
    throw new RangeError('token: required (the admin token or a party token)');
  if (/[\r\n\0]/.test(o.token)) throw new RangeError('token: must not contain line breaks or NUL');
  return { ...transport, token: o.token, retry: retryWithDefaults(o.retry), onRetry: o.onRetry };
}

/**
 * {@link withDefaults} for the transport alone (health checks need no token).
 * @throws RangeError naming the option that is wrong.
 */
export function transportDefaults(o: TransportOptions): ResolvedTransport {
  const { host, port } = parseAddress(o.address);
  const insecure = o.insecure ?? false;
  if (o.tls === undefined && !insecure && !isLoopbackHost(host)) {
    throw new RangeError(
      `insecure: refusing plaintext to ${o.address}, which is not a loopback address: ` +
        'give tls (e.g. tls: {} to trust the CAs Node trusts, or tls.ca) or set insecure: true',
    );
  }
  let tls: ResolvedClientOptions['tls'];
  if (o.tls !== undefined) {
    tls = {
      ca: readPem(o.tls.ca, 'tls.ca'),
      cert: readPem(o.tls.cert, 'tls.cert'),
      key: readPem(o.tls.key, 'tls.key'),
      serverName: o.tls.serverName,
    };
    if ((tls.cert === undefined) !== (tls.key === undefined))
      throw new RangeError('tls.cert and tls.key: give both or neither');
  }
  const timeoutMs = o.timeoutMs ?? 30_000;
  if (!(Number.isFinite(timeoutMs) && timeoutMs > 0))
    throw new RangeError(`timeoutMs: must be a positive number, got ${timeoutMs}`);
  const maxMessageBytes = o.maxMessageBytes ?? 32 * 1024 * 1024;
  if (!(Number.isInteger(maxMessageBytes) && maxMessageBytes >= 1024)) {
    throw new RangeError(`maxMessageBytes: must be an integer ≥ 1024, got ${maxMessageBytes}`);
  }
  return { address: o.address, host, port, tls, insecure, timeoutMs, maxMessageBytes };
}

/** The channel credentials of `o`: TLS with its files, or plaintext. */
export function channelCredentials(o: ResolvedTransport): ChannelCredentials {
  return o.tls === undefined
    ? credentials.createInsecure()
    : credentials.createSsl(o.tls.ca ?? null, o.tls.key ?? null, o.tls.cert ?? null);
}

/** The channel options that check the server's certificate against `tls.serverName`, when set. */
export function serverNameOptions(o: ResolvedTransport): ChannelOptions {
  return o.tls?.serverName !== undefined
    ? { 'grpc.ssl_target_name_override': o.tls.serverName, 'grpc.default_authority': o.tls.serverName }
    : {};
}

/** The channel and the service clients on it. @internal */
export class Connection {
  readonly options: ResolvedClientOptions;
  readonly jobs: JobServiceClient;
  readonly uploads: UploadServiceClient;
  readonly downloads: DownloadServiceClient;
  readonly evaluations: EvaluationServiceClient;
  readonly secure: SecureAggregationServiceClient;
  private readonly channel: Channel;
  private closed = false;

  constructor(options: DppaClientOptions) {
    this.options = withDefaults(options);
    const o = this.options;
    const creds = channelCredentials(o);
    const channelOptions: ChannelOptions = {
      'grpc.max_send_message_length': o.maxMessageBytes,
      'grpc.max_receive_message_length': o.maxMessageBytes,
      // Our own retries resume transfers where they stopped; grpc-js's would replay a whole stream.
      'grpc.enable_retries': 0,
      // Downloads: HTTP/2's default 64 KiB receive window makes the server wait for the client every 64 KiB.
      'grpc-node.flow_control_window': 4 * 1024 * 1024,
      // A server that vanished without closing the connection (power loss, a frozen process, a dropped route)
      // is found within 40 s: pinged every 30 s while calls are open, the connection is dropped when a ping
      // goes unanswered for 10 s, and the calls then fail with UNAVAILABLE and are retried.
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      'grpc.keepalive_permit_without_calls': 0,
      // grpc-js backs off reconnecting up to 2 minutes by default, failing calls at once meanwhile: a server back
      // after a minute's restart would then be seen minutes late. Reconnect at least as often as we retry.
      'grpc.max_reconnect_backoff_ms': Math.max(1000, o.retry.maxDelayMs),
      ...serverNameOptions(o),
    };
    this.channel = new Channel(o.address, creds, channelOptions);
    // One channel (one HTTP/2 connection) for every service.
    const shared = { channelOverride: this.channel };
    this.jobs = new JobServiceClient(o.address, creds, shared);
    this.uploads = new UploadClientSendingRecords(o.address, creds, shared);
    this.downloads = new DownloadServiceClient(o.address, creds, shared);
    this.evaluations = new EvaluationServiceClient(o.address, creds, shared);
    this.secure = new SecureAggregationServiceClient(o.address, creds, shared);
  }

  /** A fresh count of failures in a row, within the retry budget. */
  backoff(): Backoff {
    return new Backoff(this.options.retry, { onRetry: this.options.onRetry });
  }

  /** Fresh metadata carrying the token (grpc-js may modify the object it is given). */
  metadata(): Metadata {
    if (this.closed) throw new Error(`the client for ${this.options.address} is closed`);
    const md = new Metadata();
    md.set('authorization', `Bearer ${this.options.token}`);
    return md;
  }

  /** Closes the channel; calls in flight fail with CANCELLED or UNAVAILABLE. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.channel.close();
  }
}
