/**
 * `dppa serve`: runs the aggregation server until SIGTERM or SIGINT, then
 * stops it gracefully (a second signal stops it at once). Its flags are one
 * table (proto/cli/flag-table.ts); what it prints is the server's log
 * (docs/server.md), its exit codes are in docs/cli.md.
 */
import { resolve } from 'node:path';
import {
  choice,
  helpText,
  inFlagTermsOfPaths,
  InputPathError,
  number,
  parseCommand,
  text,
  toggle,
  UsageError,
  type FlagValues,
} from '../proto/cli/flag-table.js';
import { logLevelFrom, optionsFromFlags, type InternalServerOptions } from './config.js';
import { ConfigError } from './errors.js';
import { createLogger, LOG_LEVELS, type Logger } from './log.js';
import { DppaServer, GrpcBindError } from './server.js';
import { messageOf } from '../proto/errors.js';

const NATS = 'Events and cluster (docs/events.md, docs/scale-out.md)';
const TLS = 'TLS';

/** The table of `dppa serve`'s flags; `option` names the ServerOptions field each feeds, so that its errors are told with the flag. */
const flags = {
  data: text('DIR', 'state folder: jobs, uploads, merged checkpoints (default ./dppa-data)', {
    path: 'folder',
    option: 'dataDir',
  }),
  'grpc-host': text('HOST', 'interface to listen on (default 127.0.0.1)', { option: 'grpcHost' }),
  'grpc-port': number(
    'N',
    'gRPC port; 0 picks a free one (default 50051)',
    { min: 0, max: 65535, integer: true },
    { option: 'grpcPort' },
  ),
  'metrics-port': number(
    'N',
    'port of http://HOST:N/metrics; 0 picks a free one (default 9464)',
    { min: 0, max: 65535, integer: true },
    { option: 'metricsPort' },
  ),
  'admin-token-file': text(
    'FILE',
    'file whose first line is the admin token (otherwise the DPPA_ADMIN_TOKEN environment variable; one is required)',
    { path: 'input' },
  ),
  'max-upload-bytes': number(
    'N',
    "most bytes one party may upload to one job (default 4 × the job's base checkpoint size)",
    { min: 1, integer: true },
    { option: 'maxUploadBytes' },
  ),
  'keep-uploads': toggle(
    "keep the parties' uploaded tensors once their job has merged (default: deleted then; the merged checkpoint stays)",
    { option: 'keepUploads' },
  ),
  'tls-cert': text('FILE', 'serve gRPC over TLS with this PEM certificate chain (with --tls-key)', {
    group: TLS,
    path: 'input',
    option: 'tls.certFile',
  }),
  'tls-key': text('FILE', 'PEM private key of --tls-cert', { group: TLS, path: 'input', option: 'tls.keyFile' }),
  'tls-client-ca': text('FILE', 'require client certificates signed by this PEM CA (mutual TLS)', {
    group: TLS,
    path: 'input',
    option: 'tls.clientCaFile',
  }),
  insecure: toggle('allow plaintext gRPC on a non-loopback host', { group: TLS, option: 'insecure' }),
  nats: text(
    'URL',
    'also publish every job event to NATS JetStream on dppa.jobs.<job>.<event>; the server does not start while NATS is unreachable (default: DPPA_NATS_URL, else none)',
    { group: NATS, option: 'nats.url' },
  ),
  'nats-creds': text('FILE', 'NATS credentials file (user JWT and NKey seed)', {
    group: NATS,
    path: 'input',
    option: 'nats.credsFile',
  }),
  cluster: toggle(
    'run as one replica of a cluster on --nats: jobs, events, merge and search tasks shared on JetStream; --data must be the same shared folder on every replica (default: DPPA_CLUSTER)',
    { group: NATS, option: 'cluster' },
  ),
  'log-level': choice(
    'LEVEL',
    LOG_LEVELS,
    'debug (each RPC with its job and party), info, warn, error or silent (default: DPPA_LOG_LEVEL, else info)',
  ),
  'task-ack-wait-ms': number(
    'N',
    'with --cluster: a task of a replica that died goes to another one after N ms without news (default 30000)',
    { min: 1000, integer: true },
    {
      group: NATS,
      option: 'taskAckWaitMs',
    },
  ),
  'task-attempts': number(
    'N',
    'runs of a merge or search task that fails unexpectedly before its job fails; damaged input fails it at once, a full disk pauses it, NATS away makes it wait (default 5)',
    { min: 1, integer: true },
    { option: 'taskAttempts' },
  ),
};

const SERVE = {
  name: 'serve',
  usage: '[options]',
  description: `Runs the DPPA aggregation server: jobs, party uploads, the DPA factor search
(with the parties' evaluations or an ONNX model), merge, downloads (gRPC), and
Prometheus metrics (HTTP).`,
  after: `Plaintext gRPC is only allowed on a loopback host unless --insecure is given.
SIGTERM or SIGINT stops the server gracefully; a second one stops it at once.
Exit codes: 0 stopped cleanly; 1 unexpected failure, NATS unreachable or an I/O failure (starting
again later may work); 2 bad command line or configuration (a flag's value, a file or folder it
names, a port in use: the message names the flag).`,
};

/**
 * Failures on a path a flag names that are the configuration's (exit 2); others
 * (EIO, EMFILE, ENOSPC…) may pass (exit 1).
 */
const PATH_CONFIG_CODES = new Set(['EACCES', 'EPERM', 'ENOENT', 'ENOTDIR', 'EROFS', 'EEXIST']);

/** Exit codes, as the client's CLI uses them. */
const EXIT = { ok: 0, failure: 1, usage: 2 } as const;

/** What `dppa serve` prints when it cannot start with this configuration. */
class BadConfiguration extends Error {
  override name = 'BadConfiguration';
}

/**
 * Runs `dppa serve` with `argv` (with or without the leading `serve`).
 * @param internal - Test hooks no flag sets (test/fixtures/serve-cli.ts).
 * @returns The exit code, once the server has stopped.
 */
export async function main(argv: string[], internal: InternalServerOptions = {}): Promise<number> {
  const args = argv[0] === 'serve' ? argv.slice(1) : argv;
  let server: DppaServer;
  let values: FlagValues<typeof flags> | undefined;
  let log: Logger | undefined;
  try {
    const parsed = parseCommand(SERVE, flags, args);
    if (parsed.help) {
      process.stdout.write(helpText(SERVE, flags));
      return EXIT.ok;
    }
    values = parsed.values;
    const v = values;
    log = createLogger({ level: logLevelFrom(v['log-level']) });
    const options = await optionsFromFlags({
      data: v.data,
      grpcHost: v['grpc-host'],
      grpcPort: v['grpc-port'],
      metricsPort: v['metrics-port'],
      adminTokenFile: v['admin-token-file'],
      tlsCert: v['tls-cert'],
      tlsKey: v['tls-key'],
      tlsClientCa: v['tls-client-ca'],
      insecure: v.insecure,
      maxUploadBytes: v['max-upload-bytes'],
      keepUploads: v['keep-uploads'],
      nats: v.nats,
      natsCreds: v['nats-creds'],
      cluster: v.cluster,
      taskAckWaitMs: v['task-ack-wait-ms'],
      taskAttempts: v['task-attempts'],
    });
    server = new DppaServer({ ...options, logger: log }, internal);
  } catch (err) {
    const bad = badConfiguration(err, values);
    if (bad === undefined) throw err;
    return refuse(bad.message, log);
  }

  try {
    await server.start();
  } catch (err) {
    const bad = badConfiguration(err, values);
    if (bad !== undefined) return refuse(bad.message, log);
    log.error(`dppa serve: cannot start: ${messageOf(err)}`, { err });
    return EXIT.failure;
  }
  const host = server.host.includes(':') ? `[${server.host}]` : server.host;
  const grpc = `${host}:${server.grpcPort}`;
  const metrics = `http://${host}:${server.metricsPort}/metrics`;
  log.info(`grpc listening on ${grpc}`, { grpc });
  log.info(`metrics listening on ${metrics}`, { metrics });
  return untilStopped(server, log);
}

/** A bad command line or configuration: on stderr as any dppa command says it, or through the log once there is one. */
function refuse(message: string, log: Logger | undefined): number {
  if (log === undefined) process.stderr.write(`dppa serve: ${message}\n(see dppa serve --help)\n`);
  else log.error(`dppa serve: ${message} (see dppa serve --help)`);
  return EXIT.usage;
}

/**
 * A failure that is the configuration's, told with the flag it comes from;
 * undefined for anything else.
 */
function badConfiguration(err: unknown, values: FlagValues<typeof flags> | undefined): BadConfiguration | undefined {
  if (err instanceof UsageError || err instanceof InputPathError)
    return new BadConfiguration(err.message, { cause: err });
  if (err instanceof ConfigError) return new BadConfiguration(withFlagNames(err.message), { cause: err });
  if (values !== undefined && PATH_CONFIG_CODES.has((err as NodeJS.ErrnoException).code ?? '')) {
    const told = inFlagTermsOfPaths(err, flags, { ...values, data: resolve(values.data ?? './dppa-data') });
    if (told !== err) return new BadConfiguration(messageOf(told), { cause: err });
  }
  const e = err as NodeJS.ErrnoException;
  if (e instanceof Error && e.syscall === 'listen')
    return new BadConfiguration(`--metrics-port: cannot listen: ${e.message.replace(/^listen /, '')}`, { cause: err });
  if (err instanceof GrpcBindError)
    return new BadConfiguration(`--grpc-host/--grpc-port: cannot listen on ${err.address}: ${err.reason}`, {
      cause: err,
    });
  return undefined;
}

/** `grpcPort: must be …` as `--grpc-port: must be …`; the admin token by where it comes from. */
function withFlagNames(message: string): string {
  const m = /^([\w.]+): /.exec(message);
  if (m === null) return message;
  const name = m[1]!;
  if (name === 'adminToken')
    return `the admin token (DPPA_ADMIN_TOKEN or --admin-token-file): ${message.slice(m[0].length)}`;
  const flag = Object.entries(flags).find(
    ([, f]) => f.option === name || (name === 'tls' && f.option === 'tls.certFile'),
  )?.[0];
  return flag === undefined
    ? message
    : `--${flag}${name === 'tls' ? ' and --tls-key' : ''}: ${message.slice(m[0].length)}`;
}

/** Stops the server on SIGTERM/SIGINT (gracefully the first time, at once the second) and resolves to the exit code. */
async function untilStopped(server: DppaServer, log: Logger): Promise<number> {
  let signals = 0;
  let onSignal: ((sig: NodeJS.Signals) => void) | undefined;
  try {
    return await new Promise<number>((resolve) => {
      onSignal = (sig) => {
        signals++;
        log.info(
          `dppa serve: ${sig}, ${signals === 1 ? 'stopping (send it again to stop at once)' : 'stopping at once'}`,
          { signal: sig },
        );
        server.stop({ graceful: signals === 1 }).then(
          () => resolve(EXIT.ok),
          (err: unknown) => {
            log.error('dppa serve: stop failed', { err });
            resolve(EXIT.failure);
          },
        );
      };
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
    });
  } finally {
    if (onSignal !== undefined) {
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
    }
  }
}
