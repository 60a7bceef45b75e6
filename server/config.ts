/**
 * The server's options: one {@link ServerOptions} object, resolved once by
 * {@link withDefaults}. This is the only module that reads the environment.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import { ConfigError } from './errors.js';
import { DEFAULT_TASK_ATTEMPTS } from './jobs/failure-policy.js';
import { DEFAULT_STORAGE_RETRY_MS } from './jobs/storage-pauses.js';
import { createLogger, LOG_LEVELS, type Logger } from './log.js';
import { DEFAULT_HTTP2_WINDOW, MAX_HTTP2_WINDOW } from './rpc/receive-window.js';
import type { ClosingPhase } from './secure/secure-jobs.js';
import { messageOf } from '../proto/errors.js';

/** TLS files of the gRPC listener. */
export interface TlsOptions {
  /** PEM certificate chain of the server. */
  certFile: string;
  /** PEM private key of the server. */
  keyFile: string;
  /** PEM CA bundle; when given, clients must present a certificate it signed (mutual TLS). @default none */
  clientCaFile?: string;
}

/** Where the server publishes job events: a NATS server with JetStream (docs/events.md). */
export interface NatsOptions {
  /** Server URL, `nats://HOST:PORT` or `tls://HOST:PORT` (`HOST:PORT` means `nats://`); several, comma-separated, for a cluster. */
  url: string;
  /** NATS credentials file (user JWT and NKey seed, as `nsc` writes it). @default none: connect without credentials */
  credsFile?: string;
}

/** Options of {@link DppaServer}. */
export interface ServerOptions {
  /** Admin bearer token (CreateJob, ListJobs, CancelJob, downloads). Required: the server refuses to start without one. */
  adminToken: string;
  /** Folder of the server's state: jobs, uploads, merged checkpoints. @default './dppa-data' */
  dataDir?: string;
  /** Interface the gRPC and metrics listeners bind to. @default '127.0.0.1' */
  grpcHost?: string;
  /** gRPC port; 0 picks a free one (read it back from `DppaServer.grpcPort`). @default 50051 */
  grpcPort?: number;
  /** Port of the Prometheus endpoint `/metrics`; 0 picks a free one. @default 9464 */
  metricsPort?: number;
  /** Serve gRPC over TLS. Plaintext is only allowed on a loopback host unless `insecure` is set. @default none */
  tls?: TlsOptions;
  /** Allow plaintext gRPC on a non-loopback host. @default false */
  insecure?: boolean;
  /** Most bytes of delta one party may upload to one job. @default 4 × the job's base checkpoint size */
  maxUploadBytes?: number;
  /** Largest gRPC message accepted; larger ones get RESOURCE_EXHAUSTED. @default 8 MiB */
  maxMessageBytes?: number;
  /**
   * HTTP/2 receive window of each connection and each of its streams: how many
   * bytes a client may send before it waits for the server to read them. The
   * protocol's default, 64 KiB, halved a bare grpc-js upload here (docs/performance.md);
   * a connection buffers at most this much for a call the server holds back.
   * @default 4 MiB
   */
  receiveWindowBytes?: number;
  /** How long a graceful stop lets in-flight calls finish before cutting them off. @default 10000 */
  shutdownGraceMs?: number;
  /**
   * How often the server pings each client connection (HTTP/2 PING), in ms; a
   * connection whose ping is not answered within `keepaliveTimeoutMs` is
   * dropped and its calls cancelled, so that a client that vanished or froze
   * does not hold its calls (and a party's upload slot) until TCP gives up.
   * @default 30000
   */
  keepaliveMs?: number;
  /** How long a keepalive ping may go unanswered before the connection is dropped, in ms. @default 10000 */
  keepaliveTimeoutMs?: number;
  /** Worker threads of a merge; 0 merges in the main thread. @default min(2, available cores) */
  mergeWorkers?: number;
  /**
   * Keep the parties' uploaded tensors once their job has merged (to merge
   * them again by hand, or to look into them). By default they are deleted
   * then: only the merged checkpoint is needed from that point.
   * @default false
   */
  keepUploads?: boolean;
  /**
   * Also publish every job event to NATS JetStream (docs/events.md). The
   * server then refuses to start while NATS cannot be reached; once started, it
   * keeps working without NATS and publishes what it missed when NATS returns.
   * @default none: events are kept in the data folder and streamed by WatchJob only
   */
  nats?: NatsOptions;
  /**
   * Run as one replica of a cluster sharing `nats` (docs/scale-out.md): jobs
   * in a JetStream KV bucket, events in the JetStream stream, merges split
   * into tasks on a work queue; `dataDir` must be the same shared folder on
   * every replica. Needs `nats`. Jobs whose DPA search uses the remote evaluator are refused.
   * @default false: one server, everything in its data folder
   */
  cluster?: boolean;
  /**
   * With `cluster`: how long a task a replica took may go unacknowledged
   * before another replica gets it (a replica killed mid-task costs this
   * long); replicas at work say so every third of it. The replica started
   * last sets it for all.
   * @default 30000
   */
  taskAckWaitMs?: number;
  /**
   * How often a task of a merge or search (a tensor, a party's search) runs
   * when it fails in a way that may pass (an unexpected error, NATS away),
   * the first run included, before its job fails with the reason and the
   * count; after NATS away the job waits for NATS instead (failing it needs
   * NATS). Damaged input fails the job at once; a storage failure pauses it.
   * @default 5
   */
  taskAttempts?: number;
  /**
   * First wait before a job paused by a storage failure (a full disk, an I/O
   * error) is tried again; it doubles after each failure, up to 5 minutes. A
   * merge is only tried again once the disk has room for its output.
   * @default 5000
   */
  storageRetryMs?: number;
  /** Where the server logs. @default JSON lines on stderr at level info */
  logger?: Logger;
}

/**
 * Test hooks of {@link DppaServer}: no flag and no field of {@link ServerOptions} sets them, and index.ts does not
 * export them. Only `dppa serve`'s `main` passes them on (test/fixtures/serve-cli.ts sets them from
 * `DPPA_TEST_MASKED_LEASE_MS` and `DPPA_TEST_CLOSE_BARRIER`).
 */
export interface InternalServerOptions {
  /**
   * With `cluster`: how long a replica's claim on a party's masked upload keeps the other replicas' streams for that
   * party away (renewed after half of it while the stream writes); tests shorten it.
   * @default 60000
   */
  maskedLeaseMs?: number;
  /**
   * With `cluster`: awaited by a replica right before it claims the closing of a secure job's SUPPORT or UNMASK phase
   * (the phases that write files). test/cluster-secure.test.ts holds two replicas there until both arrived, so that
   * they race for the claim.
   * @default none
   */
  beforeCloseClaim?: (jobId: string, phase: ClosingPhase) => Promise<void>;
}

/** {@link ServerOptions} and {@link InternalServerOptions} with every default filled in. */
export interface ResolvedServerOptions {
  adminToken: string;
  dataDir: string;
  grpcHost: string;
  grpcPort: number;
  metricsPort: number;
  tls: TlsOptions | undefined;
  insecure: boolean;
  /** Undefined: 4 × the base checkpoint size, decided per job. */
  maxUploadBytes: number | undefined;
  maxMessageBytes: number;
  receiveWindowBytes: number;
  shutdownGraceMs: number;
  keepaliveMs: number;
  keepaliveTimeoutMs: number;
  mergeWorkers: number;
  keepUploads: boolean;
  nats: NatsOptions | undefined;
  cluster: boolean;
  taskAckWaitMs: number;
  taskAttempts: number;
  storageRetryMs: number;
  /** Undefined: the default of SecureJobs. */
  maskedLeaseMs: number | undefined;
  beforeCloseClaim: ((jobId: string, phase: ClosingPhase) => Promise<void>) | undefined;
  logger: Logger;
}

/** Shortest admin token accepted: 16 characters keep guessing out of reach for any sane token alphabet. */
const MIN_ADMIN_TOKEN_LENGTH = 16;

/**
 * Fills in defaults and checks every option.
 * @throws ConfigError naming the option that is missing or wrong.
 */
export function withDefaults(opts: ServerOptions, internal: InternalServerOptions = {}): ResolvedServerOptions {
  const r: ResolvedServerOptions = {
    adminToken: opts.adminToken,
    dataDir: resolve(opts.dataDir ?? './dppa-data'),
    grpcHost: opts.grpcHost ?? '127.0.0.1',
    grpcPort: opts.grpcPort ?? 50051,
    metricsPort: opts.metricsPort ?? 9464,
    tls: opts.tls,
    insecure: opts.insecure ?? false,
    maxUploadBytes: opts.maxUploadBytes,
    maxMessageBytes: opts.maxMessageBytes ?? 8 * 1024 * 1024,
    receiveWindowBytes: opts.receiveWindowBytes ?? 4 * 1024 * 1024,
    shutdownGraceMs: opts.shutdownGraceMs ?? 10_000,
    keepaliveMs: opts.keepaliveMs ?? 30_000,
    keepaliveTimeoutMs: opts.keepaliveTimeoutMs ?? 10_000,
    mergeWorkers: opts.mergeWorkers ?? Math.min(2, availableParallelism()),
    keepUploads: opts.keepUploads ?? false,
    nats: opts.nats,
    cluster: opts.cluster ?? false,
    taskAckWaitMs: opts.taskAckWaitMs ?? 30_000,
    taskAttempts: opts.taskAttempts ?? DEFAULT_TASK_ATTEMPTS,
    storageRetryMs: opts.storageRetryMs ?? DEFAULT_STORAGE_RETRY_MS,
    maskedLeaseMs: internal.maskedLeaseMs,
    beforeCloseClaim: internal.beforeCloseClaim,
    logger: opts.logger ?? createLogger(),
  };
  if (typeof r.adminToken !== 'string' || r.adminToken.trim() === '') {
    throw new ConfigError('adminToken: an admin token is required (set DPPA_ADMIN_TOKEN or pass --admin-token-file)');
  }
  if (r.adminToken.length < MIN_ADMIN_TOKEN_LENGTH) {
    throw new ConfigError(
      `adminToken: must be at least ${MIN_ADMIN_TOKEN_LENGTH} characters, got ${r.adminToken.length}`,
    );
  }
  if (r.grpcHost === '') throw new ConfigError('grpcHost: must not be empty');
  checkPort('grpcPort', r.grpcPort);
  checkPort('metricsPort', r.metricsPort);
  if (r.maxUploadBytes !== undefined) checkPositiveInteger('maxUploadBytes', r.maxUploadBytes);
  checkPositiveInteger('maxMessageBytes', r.maxMessageBytes);
  if (
    !Number.isSafeInteger(r.receiveWindowBytes) ||
    r.receiveWindowBytes < DEFAULT_HTTP2_WINDOW ||
    r.receiveWindowBytes > MAX_HTTP2_WINDOW
  ) {
    throw new ConfigError(
      `receiveWindowBytes: must be an integer from ${DEFAULT_HTTP2_WINDOW} to ${MAX_HTTP2_WINDOW} (HTTP/2's limits), got ${r.receiveWindowBytes}`,
    );
  }
  if (!Number.isSafeInteger(r.shutdownGraceMs) || r.shutdownGraceMs < 0) {
    throw new ConfigError(`shutdownGraceMs: must be a non-negative integer, got ${r.shutdownGraceMs}`);
  }
  checkPositiveInteger('keepaliveMs', r.keepaliveMs);
  checkPositiveInteger('keepaliveTimeoutMs', r.keepaliveTimeoutMs);
  if (!Number.isSafeInteger(r.mergeWorkers) || r.mergeWorkers < 0)
    throw new ConfigError(`mergeWorkers: must be a non-negative integer, got ${r.mergeWorkers}`);
  if (r.nats !== undefined) checkNats(r.nats);
  if (!Number.isSafeInteger(r.taskAttempts) || r.taskAttempts < 1)
    throw new ConfigError(`taskAttempts: must be an integer of at least 1, got ${r.taskAttempts}`);
  if (!Number.isSafeInteger(r.taskAckWaitMs) || r.taskAckWaitMs < 1000)
    throw new ConfigError(`taskAckWaitMs: must be an integer of at least 1000, got ${r.taskAckWaitMs}`);
  checkPositiveInteger('storageRetryMs', r.storageRetryMs);
  if (r.maskedLeaseMs !== undefined) checkPositiveInteger('maskedLeaseMs', r.maskedLeaseMs);
  if (r.cluster && r.nats === undefined)
    throw new ConfigError(
      'cluster: needs nats (--nats URL or DPPA_NATS_URL): the replicas share their state on NATS JetStream',
    );
  if (r.tls !== undefined && (r.tls.certFile === '' || r.tls.keyFile === '')) {
    throw new ConfigError('tls: certFile and keyFile are both required');
  }
  if (r.tls === undefined && !r.insecure && !isLoopback(r.grpcHost)) {
    throw new ConfigError(
      `grpcHost: ${r.grpcHost} is not a loopback address, so plaintext gRPC would be exposed: configure tls (--tls-cert, --tls-key) or set insecure (--insecure)`,
    );
  }
  return r;
}

function checkPort(name: string, port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new ConfigError(`${name}: must be an integer in [0, 65535], got ${port}`);
}

function checkPositiveInteger(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 1) throw new ConfigError(`${name}: must be a positive integer, got ${v}`);
}

function checkNats(nats: NatsOptions): void {
  if (typeof nats.url !== 'string' || nats.url.trim() === '') throw new ConfigError('nats.url: must not be empty');
  for (const server of natsServers(nats.url)) {
    let url: URL;
    try {
      url = new URL(server.includes('://') ? server : `nats://${server}`);
    } catch (cause) {
      throw new ConfigError(`nats.url: ${JSON.stringify(redactUrl(server))} is not a URL`, { cause });
    }
    if (url.protocol !== 'nats:' && url.protocol !== 'tls:')
      throw new ConfigError(`nats.url: ${JSON.stringify(redactUrl(server))}: expected nats:// or tls://`);
    if (url.hostname === '') throw new ConfigError(`nats.url: ${JSON.stringify(redactUrl(server))} names no host`);
  }
  if (nats.credsFile === '') throw new ConfigError('nats.credsFile: must not be empty');
}

/**
 * A NATS URL option (one URL or a comma-separated list) as it may be shown in a
 * log line or an error: user, password or token before `@` become `***`.
 */
export function redactUrl(url: string): string {
  return url.replace(/(\/\/|^|,)[^\s,/]*@/g, '$1***@');
}

/** The servers of a NATS URL option: comma-separated, blanks ignored. */
export function natsServers(url: string): string[] {
  return url
    .split(',')
    .map((u) => u.trim())
    .filter((u) => u !== '');
}

/** True for `localhost` and loopback IP addresses, the only hosts where plaintext stays on the machine. */
export function isLoopback(host: string): boolean {
  const h = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (h === 'localhost') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || /^::ffff:127\./i.test(h);
  return false;
}

/** The `dppa serve` flags, as the command line's table converted them (server/cli.ts). */
export interface ServeFlags {
  data?: string | undefined;
  grpcHost?: string | undefined;
  grpcPort?: number | undefined;
  metricsPort?: number | undefined;
  adminTokenFile?: string | undefined;
  tlsCert?: string | undefined;
  tlsKey?: string | undefined;
  tlsClientCa?: string | undefined;
  insecure?: boolean | undefined;
  maxUploadBytes?: number | undefined;
  keepUploads?: boolean | undefined;
  nats?: string | undefined;
  natsCreds?: string | undefined;
  cluster?: boolean | undefined;
  taskAckWaitMs?: number | undefined;
  taskAttempts?: number | undefined;
}

/**
 * Builds server options from `dppa serve` flags and the environment: the admin
 * token comes from `--admin-token-file` (first line, trimmed) or else from
 * `DPPA_ADMIN_TOKEN`; the NATS URL from `--nats` or else `DPPA_NATS_URL`;
 * cluster mode from `--cluster` or else `DPPA_CLUSTER` (`1`/`true`).
 * @param env The environment. @default process.env
 * @throws ConfigError naming the flag that is wrong or missing.
 */
export async function optionsFromFlags(
  flags: ServeFlags,
  env: NodeJS.ProcessEnv = process.env,
): Promise<ServerOptions> {
  let adminToken = env.DPPA_ADMIN_TOKEN ?? '';
  if (flags.adminTokenFile !== undefined) {
    try {
      adminToken = (await readFile(flags.adminTokenFile, 'utf8')).split(/\r?\n/)[0]!.trim();
    } catch (cause) {
      throw new ConfigError(`--admin-token-file: cannot read ${flags.adminTokenFile}: ${messageOf(cause)}`, { cause });
    }
  }
  if (adminToken === '') {
    throw new ConfigError(
      'no admin token: set DPPA_ADMIN_TOKEN or pass --admin-token-file FILE (refusing to start an unprotected server)',
    );
  }
  if ((flags.tlsCert === undefined) !== (flags.tlsKey === undefined))
    throw new ConfigError('--tls-cert and --tls-key go together');
  if (flags.tlsClientCa !== undefined && flags.tlsCert === undefined)
    throw new ConfigError('--tls-client-ca needs --tls-cert and --tls-key');
  const opts: ServerOptions = { adminToken };
  if (flags.data !== undefined) opts.dataDir = flags.data;
  if (flags.grpcHost !== undefined) opts.grpcHost = flags.grpcHost;
  if (flags.grpcPort !== undefined) opts.grpcPort = flags.grpcPort;
  if (flags.metricsPort !== undefined) opts.metricsPort = flags.metricsPort;
  if (flags.maxUploadBytes !== undefined) opts.maxUploadBytes = flags.maxUploadBytes;
  if (flags.insecure === true) opts.insecure = true;
  if (flags.keepUploads === true) opts.keepUploads = true;
  const natsUrl = flags.nats ?? (env.DPPA_NATS_URL === '' ? undefined : env.DPPA_NATS_URL);
  if (flags.natsCreds !== undefined && natsUrl === undefined)
    throw new ConfigError('--nats-creds needs --nats URL (or DPPA_NATS_URL)');
  if (natsUrl !== undefined)
    opts.nats = { url: natsUrl, ...(flags.natsCreds === undefined ? {} : { credsFile: flags.natsCreds }) };
  if (flags.cluster === true || envFlag('DPPA_CLUSTER', env.DPPA_CLUSTER)) {
    if (natsUrl === undefined) throw new ConfigError('--cluster needs --nats URL (or DPPA_NATS_URL)');
    opts.cluster = true;
  }
  if (flags.taskAckWaitMs !== undefined) {
    if (opts.cluster !== true) throw new ConfigError('--task-ack-wait-ms needs --cluster');
    opts.taskAckWaitMs = flags.taskAckWaitMs;
  }
  if (flags.taskAttempts !== undefined) opts.taskAttempts = flags.taskAttempts;
  if (flags.tlsCert !== undefined && flags.tlsKey !== undefined) {
    // Read here, so that a wrong file is told with its flag before anything starts.
    await pemFile('tls-cert', flags.tlsCert, (pem) => new X509Certificate(pem));
    await pemFile('tls-key', flags.tlsKey, (pem) => createPrivateKey(pem));
    if (flags.tlsClientCa !== undefined)
      await pemFile('tls-client-ca', flags.tlsClientCa, (pem) => new X509Certificate(pem));
    opts.tls = {
      certFile: flags.tlsCert,
      keyFile: flags.tlsKey,
      ...(flags.tlsClientCa === undefined ? {} : { clientCaFile: flags.tlsClientCa }),
    };
  }
  return opts;
}

/** A boolean environment variable: unset, empty, `0` or `false` is off; `1` or `true` is on. */
function envFlag(name: string, value: string | undefined): boolean {
  const v = (value ?? '').trim().toLowerCase();
  if (v === '' || v === '0' || v === 'false') return false;
  if (v === '1' || v === 'true') return true;
  throw new ConfigError(`${name}: expected 1, true, 0 or false, got ${JSON.stringify(value)}`);
}

/** Reads a PEM file given by `--flag` and parses it. @throws ConfigError naming the flag when it cannot be read or parsed. */
async function pemFile(flag: string, path: string, parse: (pem: Buffer) => unknown): Promise<void> {
  let pem: Buffer;
  try {
    pem = await readFile(path);
  } catch (cause) {
    throw new ConfigError(`--${flag}: cannot read ${path}: ${messageOf(cause)}`, { cause });
  }
  try {
    parse(pem);
  } catch (cause) {
    throw new ConfigError(
      `--${flag}: ${path} is not a PEM ${flag === 'tls-key' ? 'private key' : 'certificate'}: ${messageOf(cause)}`,
      { cause },
    );
  }
}

/**
 * The log level of `dppa serve`: `--log-level`, else `DPPA_LOG_LEVEL`, else `info`.
 * @param env The environment. @default process.env
 * @throws ConfigError when `DPPA_LOG_LEVEL` is not a level.
 */
export function logLevelFrom(
  flag: (typeof LOG_LEVELS)[number] | undefined,
  env: NodeJS.ProcessEnv = process.env,
): (typeof LOG_LEVELS)[number] {
  if (flag !== undefined) return flag;
  const v = env.DPPA_LOG_LEVEL?.trim() ?? '';
  if (v === '') return 'info';
  const level = LOG_LEVELS.find((l) => l === v.toLowerCase());
  if (level === undefined)
    throw new ConfigError(`DPPA_LOG_LEVEL: expected one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(v)}`);
  return level;
}
