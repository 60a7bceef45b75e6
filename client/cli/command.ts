import { ProgressLine } from './progress.js';

/** The shape of one `dppa` sub-command. */
export interface Command {
  /** As typed: `prune`, `job create`. */
  name: string;
  /** One line for `dppa --help`. */
  summary: string;
  /** The full `--help` text. */
  help: string;
  /** Runs the command; resolves to the exit code. Throws for failures (turned into codes in one place). */
  run(argv: string[]): Promise<number>;
}

/** Writes one line to stdout. */
export function out(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** Writes one line to stderr. */
export function note(line: string): void {
  process.stderr.write(`${line}\n`);
}

/**
 * Runs a long command with Ctrl-C turned into an AbortSignal and a progress
 * line that is cleared however the command ends.
 */
export async function cancellable<T>(work: (signal: AbortSignal, progress: ProgressLine) => Promise<T>): Promise<T> {
  const progress = new ProgressLine();
  const controller = new AbortController();
  const onSigint = (): void => controller.abort();
  process.once('SIGINT', onSigint);
  try {
    return await work(controller.signal, progress);
  } finally {
    progress.done();
    process.off('SIGINT', onSigint);
  }
}
