/** Value conversions of the client's flags that the shared table (proto/cli/flag-table.ts) lacks. */
import parseDuration from 'parse-duration';
import { custom, type Flag } from '../../proto/cli/flag-table.js';

/** A duration with its unit (`90s`, `10m`, `1h30m`; `0` alone needs none), in ms. @throws Error saying what was expected. */
export function toDuration(value: string): number {
  const v = value.trim();
  // A bare number would be read as milliseconds: ask for the unit rather than guess.
  const ms = v === '0' ? 0 : /^[\d.]+$/.test(v) ? null : parseDuration(v);
  if (ms === null || ms === undefined || !Number.isFinite(ms) || ms < 0) {
    throw new Error(`expected a duration with its unit (e.g. 90s, 10m, 1h), got ${JSON.stringify(value)}`);
  }
  return Math.round(ms);
}

/** A duration flag, its value in ms. */
export function durationFlag(arg: string, help: string, o: { group?: string } = {}): Flag<number, false> {
  return custom(arg, help, toDuration, o);
}

/** Drops undefined values so that optional options stay absent (exactOptionalPropertyTypes). */
export function defined<T extends object>(o: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, x]) => x !== undefined)) as {
    [K in keyof T]?: Exclude<T[K], undefined>;
  };
}
