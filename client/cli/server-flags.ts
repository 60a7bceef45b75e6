/**
 * What every command that talks to a server shares: the connection flags,
 * where the token comes from, retries told on stderr, Ctrl-C, and closing
 * the client.
 */
import { readFileSync } from 'node:fs';
import { status as Status } from '@grpc/grpc-js';
import { DppaClient } from '../sdk/client.js';
import {
  isLoopbackHost,
  parseAddress,
  type DppaClientOptions,
  type TlsOptions,
  type TransportOptions,
} from '../sdk/connection.js';
import { DppaRpcError } from '../sdk/errors.js';
import { DEFAULT_RETRY, type RetryNotice } from '../sdk/retry.js';
import { number, text, toggle, type FlagValues } from '../../proto/cli/flag-table.js';
import { durationFlag } from './args.js';
import { cancellable, note } from './command.js';
import { UsageError } from './exit-codes.js';
import { formatDuration, type ProgressLine } from './progress.js';

const CONNECTION = 'Connection';

/** Connection flags. */
export const serverFlags = {
  server: text('HOST:PORT', 'the aggregation server ([::1]:PORT for IPv6)', { required: true, group: CONNECTION }),
  tls: toggle('use TLS, trusting the CAs Node trusts (implied by the --tls-* flags)', { group: CONNECTION }),
  'tls-ca': text('FILE', "PEM of the CA that signed the server's certificate", { group: CONNECTION }),
  'tls-cert': text('FILE', 'client certificate (PEM), for servers that require mutual TLS', { group: CONNECTION }),
  'tls-key': text('FILE', 'private key of --tls-cert (PEM)', { group: CONNECTION }),
  'tls-server-name': text('NAME', "name to check the server's certificate against (default: the host)", {
    group: CONNECTION,
  }),
  insecure: toggle(
    'allow plaintext to a server that is not on this machine (the token and data then cross the network unencrypted; loopback needs no flag)',
    { group: CONNECTION },
  ),
  'timeout-ms': number(
    'N',
    'time limit of each attempt of a request, default 30000 (a push, pull or watch as a whole has none; interrupt it with Ctrl-C)',
    { min: 1, integer: true },
    { group: CONNECTION },
  ),
  'retry-for': durationFlag(
    'DURATION',
    `keep retrying while the server is unreachable, restarting or does not answer, for DURATION from the first failure in a row (e.g. 90s, 10m, 1h; 0 gives up at once), default ${formatDuration(DEFAULT_RETRY.forMs)}; each wait is told on stderr`,
    { group: CONNECTION },
  ),
};

/** Connection flags of a command that asks once (`dppa health`: a probe wants the answer of now). */
export const onceServerFlags = (({ 'retry-for': _retryFor, ...rest }) => rest)(serverFlags);

/** The admin token's flag. */
export const adminTokenFlags = {
  'admin-token-file': text('FILE', 'file holding the admin token (default: $DPPA_ADMIN_TOKEN)', { group: CONNECTION }),
};

/** A party token's flags. */
export const partyTokenFlags = {
  token: text('T', "the party's token from `dppa job create` (default: $DPPA_TOKEN)", { group: CONNECTION }),
  'token-file': text('FILE', "file holding the party's token", { group: CONNECTION }),
};

/** Either token: explicit flags win, then $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN. */
export const anyTokenFlags = {
  ...adminTokenFlags,
  token: text(
    'T',
    "a party's token (a party may act on its own job; explicit flags win, then $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN)",
    { group: CONNECTION },
  ),
  'token-file': partyTokenFlags['token-file'],
};

/** Values of the flags above. */
export type ServerFlagValues = Partial<
  FlagValues<typeof serverFlags & typeof adminTokenFlags & typeof partyTokenFlags>
> &
  Pick<FlagValues<typeof serverFlags>, 'server'>;

function tokenFile(path: string, flag: string): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new UsageError(`--${flag}: cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
  const token = text.trim();
  if (token === '') throw new UsageError(`--${flag}: ${path} is empty`);
  return token;
}

function env(name: string): string | undefined {
  const v = process.env[name]?.trim();
  return v === undefined || v === '' ? undefined : v;
}

/** The admin token: --admin-token-file, else $DPPA_ADMIN_TOKEN. */
export function adminToken(v: ServerFlagValues): string {
  if (v['admin-token-file'] !== undefined) return tokenFile(v['admin-token-file'], 'admin-token-file');
  const t = env('DPPA_ADMIN_TOKEN');
  if (t === undefined) throw new UsageError('no admin token: set DPPA_ADMIN_TOKEN or pass --admin-token-file FILE');
  return t;
}

/** A party token: --token, else --token-file, else $DPPA_TOKEN. */
export function partyToken(v: ServerFlagValues): string {
  if (v.token !== undefined && v['token-file'] !== undefined)
    throw new UsageError('--token and --token-file: give one');
  if (v.token !== undefined) return v.token;
  if (v['token-file'] !== undefined) return tokenFile(v['token-file'], 'token-file');
  const t = env('DPPA_TOKEN');
  if (t === undefined)
    throw new UsageError("no token: pass --token (the party's token from `dppa job create`) or set DPPA_TOKEN");
  return t;
}

/**
 * A party or admin token, explicit flags first: --token, --token-file,
 * --admin-token-file, then $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN.
 */
export function anyToken(v: ServerFlagValues): string {
  if (v.token !== undefined || v['token-file'] !== undefined) {
    if (v['admin-token-file'] !== undefined) throw new UsageError('--token and --admin-token-file: give one');
    return partyToken(v);
  }
  if (v['admin-token-file'] !== undefined) return adminToken(v);
  const t = env('DPPA_ADMIN_TOKEN') ?? env('DPPA_TOKEN');
  if (t === undefined)
    throw new UsageError('no token: pass --token or --admin-token-file, or set DPPA_TOKEN or DPPA_ADMIN_TOKEN');
  return t;
}

/** Client options from the connection flags. */
export function clientOptions(v: ServerFlagValues, token: string): DppaClientOptions {
  return { ...transportOptions(v), token };
}

/** The connection flags without a token (health checks). */
export function transportOptions(v: ServerFlagValues): TransportOptions & Pick<DppaClientOptions, 'retry'> {
  const address = v.server;
  let host: string;
  try {
    host = parseAddress(address).host;
  } catch (err) {
    throw new UsageError(`--server: ${(err as Error).message.replace(/^address: /, '')}`, { cause: err });
  }
  const wantsTls =
    v.tls === true ||
    v['tls-ca'] !== undefined ||
    v['tls-cert'] !== undefined ||
    v['tls-key'] !== undefined ||
    v['tls-server-name'] !== undefined;
  if (!wantsTls && v.insecure !== true && !isLoopbackHost(host)) {
    throw new UsageError(
      `refusing plaintext to ${address}, which is not this machine: pass --tls (or --tls-ca FILE), or --insecure to send the token unencrypted`,
    );
  }
  if ((v['tls-cert'] === undefined) !== (v['tls-key'] === undefined))
    throw new UsageError('--tls-cert and --tls-key: give both or neither');
  const tls: TlsOptions = {};
  if (v['tls-ca'] !== undefined) tls.ca = v['tls-ca'];
  if (v['tls-cert'] !== undefined) tls.cert = v['tls-cert'];
  if (v['tls-key'] !== undefined) tls.key = v['tls-key'];
  if (v['tls-server-name'] !== undefined) tls.serverName = v['tls-server-name'];
  const o: TransportOptions & Pick<DppaClientOptions, 'retry'> = { address };
  if (wantsTls) o.tls = tls;
  if (v.insecure === true) o.insecure = true;
  if (v['timeout-ms'] !== undefined) o.timeoutMs = v['timeout-ms'];
  if (v['retry-for'] !== undefined) o.retry = { forMs: v['retry-for'] };
  return o;
}

/** One line saying what a retry waits for: `GetJob: server unavailable, retrying in 4.0s (1m52s left)`. */
export function retryLine(n: RetryNotice): string {
  const e = n.error;
  let what = 'connection dropped';
  if (e instanceof DppaRpcError) {
    if (e.code === Status.UNAVAILABLE) what = 'server unavailable';
    else if (e.code === Status.DEADLINE_EXCEEDED) what = 'no answer in time';
    else if (e.code === Status.ALREADY_EXISTS) what = "the party's upload slot is still held by an earlier stream";
    what = `${e.method}: ${what}`;
  }
  return `${what}, retrying in ${formatDuration(n.delayMs)} (${formatDuration(n.leftMs)} left)`;
}

/**
 * Runs `fn` with a client of the server, a signal that Ctrl-C aborts and a
 * progress line (see {@link cancellable}); closes the client after.
 */
export async function withClient<T>(
  options: DppaClientOptions,
  fn: (client: DppaClient, signal: AbortSignal, progress: ProgressLine) => Promise<T>,
): Promise<T> {
  return cancellable(async (signal, progress) => {
    const client = newClient({
      ...options,
      onRetry: (n) => {
        progress.done();
        note(retryLine(n));
      },
    });
    try {
      return await fn(client, signal, progress);
    } finally {
      client.close();
    }
  });
}

/** A client, its option errors told with the flags the user typed. */
function newClient(options: DppaClientOptions): DppaClient {
  try {
    return new DppaClient(options);
  } catch (err) {
    throw inFlagTerms(err);
  }
}

/** An SDK RangeError naming its option (tls.ca: …) as a UsageError naming the flag the user typed; anything else unchanged. */
export function inFlagTerms(err: unknown): unknown {
  if (!(err instanceof RangeError)) return err;
  const flags: Record<string, string> = {
    'tls.ca': '--tls-ca',
    'tls.cert': '--tls-cert',
    'tls.key': '--tls-key',
    timeoutMs: '--timeout-ms',
    'retry.forMs': '--retry-for',
    token: 'the token',
    address: '--server',
  };
  const message = err.message.replace(/^([\w.]+):/, (m, name: string) => `${flags[name] ?? name}:`);
  return new UsageError(message, { cause: err });
}
