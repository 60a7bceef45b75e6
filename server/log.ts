/**
 * A small structured logger: one JSON object per line on a stream (stderr by
 * default), so that log collectors can parse it and tests can silence it.
 */
import { inspect } from 'node:util';

/** Severity of a log line, in increasing order. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

const RANK: Record<LogLevel | 'silent', number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

/** Extra key/values of a log line. Errors are expanded to their name, message, stack and cause. */
export type LogFields = Record<string, unknown>;

/** Where the server writes what it does. */
export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

/** Options of {@link createLogger}. */
export interface LoggerOptions {
  /** Lines below this level are dropped; `silent` drops everything. @default 'info' */
  level?: LogLevel | 'silent';
  /** Where lines go. @default process.stderr */
  stream?: { write(line: string): unknown };
}

/** A logger writing JSON lines `{"time","level","msg",...fields}`. */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const min = RANK[opts.level ?? 'info'];
  const stream = opts.stream ?? process.stderr;
  const line = (level: LogLevel, msg: string, fields: LogFields | undefined): void => {
    if (RANK[level] < min) return;
    const entry: LogFields = { time: new Date().toISOString(), level, msg };
    for (const [k, v] of Object.entries(fields ?? {})) entry[k] = v instanceof Error ? describeError(v) : v;
    stream.write(`${JSON.stringify(entry, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}\n`);
  };
  return {
    debug: (msg, fields) => line('debug', msg, fields),
    info: (msg, fields) => line('info', msg, fields),
    warn: (msg, fields) => line('warn', msg, fields),
    error: (msg, fields) => line('error', msg, fields),
  };
}

function describeError(err: Error): LogFields {
  const out: LogFields = { name: err.name, message: err.message, stack: err.stack };
  if (err.cause instanceof Error) out.cause = describeError(err.cause);
  else if (err.cause !== undefined) out.cause = inspect(err.cause);
  return out;
}
