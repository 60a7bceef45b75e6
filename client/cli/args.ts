/** Command-line parsing on node:util parseArgs, with errors that name the flag. */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import parseDuration from 'parse-duration';
import { UsageError } from './exit-codes.js';

type Options = NonNullable<ParseArgsConfig['options']>;

/** What {@link parse} returns: parseArgs' own result type for these options. */
export type Parsed<O extends Options> = ReturnType<typeof parseArgs<{ args: string[]; options: O; allowPositionals: boolean; strict: true }>>;

/** Parses `argv` strictly; unknown flags and missing values become a UsageError. */
export function parse<O extends Options>(argv: string[], options: O, positionals = false): Parsed<O> {
  try {
    return parseArgs({ args: argv, options, allowPositionals: positionals, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message.replace(/^.*?: /, ''), { cause: err });
  }
}

/** A required string flag. */
export function required(value: string | undefined, flag: string): string {
  if (value === undefined || value === '') throw new UsageError(`--${flag} is required`);
  return value;
}

/** A number flag, checked against a range. */
export function num(value: string | undefined, flag: string, range: { min?: number; max?: number; below?: number; integer?: boolean } = {}): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  const bad =
    value.trim() === '' ||
    !Number.isFinite(n) ||
    (range.integer === true && !Number.isInteger(n)) ||
    (range.min !== undefined && n < range.min) ||
    (range.max !== undefined && n > range.max) ||
    (range.below !== undefined && n >= range.below);
  if (bad) {
    const want = [
      range.integer === true ? 'an integer' : 'a number',
      range.min !== undefined ? `≥ ${range.min}` : '',
      range.max !== undefined ? `≤ ${range.max}` : '',
      range.below !== undefined ? `< ${range.below}` : '',
    ].filter(Boolean).join(' ');
    throw new UsageError(`--${flag}: expected ${want}, got ${JSON.stringify(value)}`);
  }
  return n;
}

/** A duration with its unit (`90s`, `10m`, `1h30m`; `0` alone needs none), in ms. */
export function duration(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  const v = value.trim();
  // A bare number would be read as milliseconds: ask for the unit rather than guess.
  const ms = v === '0' ? 0 : /^[\d.]+$/.test(v) ? null : parseDuration(v);
  if (ms === null || ms === undefined || !Number.isFinite(ms) || ms < 0) {
    throw new UsageError(`--${flag}: expected a duration with its unit (e.g. 90s, 10m, 1h), got ${JSON.stringify(value)}`);
  }
  return Math.round(ms);
}

/** A comma-separated list of numbers, e.g. `--levels 0.9,0.8`. */
export function numList(value: string | undefined, flag: string): number[] | undefined {
  if (value === undefined) return undefined;
  return value.split(',').map((v) => num(v, flag)!);
}

/** One of a fixed set of words. */
export function oneOf<T extends string>(value: string | undefined, flag: string, allowed: readonly T[]): T | undefined {
  if (value === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(value)) throw new UsageError(`--${flag}: expected one of ${allowed.join(', ')}, got ${JSON.stringify(value)}`);
  return value as T;
}

/** Drops undefined values so that optional options stay absent (exactOptionalPropertyTypes). */
export function defined<T extends object>(o: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, x]) => x !== undefined)) as { [K in keyof T]?: Exclude<T[K], undefined> };
}
