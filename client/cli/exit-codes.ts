/**
 * Exit codes of the `dppa` command, and the one place that turns an error into
 * a message and a code.
 *
 * | code | meaning |
 * | ---- | ------- |
 * | 0 | success |
 * | 1 | unexpected failure (a bug: the message says so) |
 * | 2 | bad command line |
 * | 3 | bad input data: a checkpoint or delta file is malformed, or base and fine-tuned do not match |
 * | 4 | the server refused or failed the request |
 * | 130 | interrupted (Ctrl-C) |
 */
import { FormatError } from '../../proto/errors.js';
import { CheckpointMismatchError } from '../prune/delta-source.js';

export const EXIT = { ok: 0, failure: 1, usage: 2, data: 3, server: 4, interrupted: 130 } as const;

/** A bad command line: unknown flag, missing value, value out of range. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** The code and the message to print for an error. */
export function describeFailure(err: unknown): { code: number; message: string } {
  if (err instanceof UsageError || err instanceof RangeError) return { code: EXIT.usage, message: err.message };
  if (err instanceof FormatError || err instanceof CheckpointMismatchError) return { code: EXIT.data, message: err.message };
  if (err instanceof Error && err.name === 'AbortError') return { code: EXIT.interrupted, message: 'interrupted' };
  if (err instanceof Error && (err as NodeJS.ErrnoException).code === 'ENOENT') return { code: EXIT.data, message: err.message };
  const detail = err instanceof Error ? (err.stack ?? err.message) : String(err);
  return { code: EXIT.failure, message: `unexpected error (please report it):\n${detail}` };
}
