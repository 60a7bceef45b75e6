/**
 * The server's one logger (pino): one JSON object per line on stderr, or a
 * readable form when stderr is a terminal. Everything `dppa serve` prints
 * goes through it. Fields named like a token (`token`, `authorization`, …) are
 * redacted at the top level and one level down; a NATS URL is passed through
 * config.ts `redactUrl()` wherever it enters a message or field.
 */
import { pino, stdSerializers, stdTimeFunctions, type DestinationStream, type Logger as Pino } from 'pino';
import pinoPretty from 'pino-pretty';

/** Severity of a log line, in increasing order. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

/** Every level `--log-level` accepts. */
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'] as const;

/** Extra key/values of a log line. Errors are expanded to their type, message, stack and cause. */
export type LogFields = Record<string, unknown>;

/** Where the server writes what it does. */
export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger adding `fields` to each of its lines (an RPC's job and party). */
  child(fields: LogFields): Logger;
}

/** Options of {@link createLogger}. */
export interface LoggerOptions {
  /** Lines below this level are dropped; `silent` drops everything. @default 'info' */
  level?: (typeof LOG_LEVELS)[number];
  /** Where lines go. @default process.stderr */
  stream?: { write(line: string): unknown };
  /** The readable form instead of JSON. @default true when the stream is process.stderr and a terminal */
  pretty?: boolean;
}

/** Fields never written as they are, at the top level or one level down. */
const SECRETS = ['authorization', 'token', 'tokens', 'adminToken', 'password'];

/** A logger writing JSON lines `{"level","time","msg",...fields}`. */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const pretty = opts.pretty ?? (opts.stream === undefined && process.stderr.isTTY);
  let destination: DestinationStream;
  if (pretty)
    destination = pinoPretty({
      destination: opts.stream === undefined ? 2 : opts.stream,
      sync: true,
      translateTime: 'SYS:HH:MM:ss.l',
      colorize: opts.stream === undefined,
    });
  else destination = opts.stream === undefined ? pino.destination({ fd: 2, sync: true }) : opts.stream;
  const root = pino(
    {
      level: opts.level ?? 'info',
      base: null,
      timestamp: stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      // Errors are expanded by expand(); pino's own serializer of `err` would wrap them again.
      serializers: { err: (e: unknown) => e },
      redact: { paths: SECRETS.flatMap((k) => [k, `*.${k}`]), censor: '[redacted]' },
    },
    destination,
  );
  return wrap(root);
}

function wrap(p: Pino): Logger {
  const line = (level: LogLevel) => (msg: string, fields?: LogFields) => {
    if (!p.isLevelEnabled(level)) return;
    if (fields === undefined) p[level](msg);
    else p[level](expand(fields), msg);
  };
  return {
    debug: line('debug'),
    info: line('info'),
    warn: line('warn'),
    error: line('error'),
    child: (fields) => wrap(p.child(expand(fields))),
  };
}

function expand(fields: LogFields): LogFields {
  const out: LogFields = {};
  for (const [k, v] of Object.entries(fields))
    out[k] = v instanceof Error ? stdSerializers.errWithCause(v) : typeof v === 'bigint' ? v.toString() : v;
  return out;
}
