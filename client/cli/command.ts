import {
  helpText,
  inFlagTermsOfPaths,
  parseCommand,
  type CommandText,
  type FlagTable,
  type FlagValues,
  type PathRole,
} from '../../proto/cli/flag-table.js';
import { EXIT } from './exit-codes.js';
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

/** A command as declared: its `--help` text, its table of flags and what it does with their values. */
export interface CommandSpec<F extends FlagTable> extends CommandText {
  /** One line for `dppa --help`. */
  summary: string;
  flags: F;
  /**
   * Does the work with the checked values (and positionals, in the order declared).
   * @returns The exit code. Throws for failures (turned into codes in one place).
   */
  action(values: FlagValues<F>, positionals: string[]): Promise<number>;
}

/**
 * A command from its declaration: `run` parses with the table (printing
 * `--help` when asked) and tells failures on a path with the flag that gave it.
 */
export function defineCommand<F extends FlagTable>(spec: CommandSpec<F>): Command {
  return {
    name: spec.name,
    summary: spec.summary,
    get help() {
      return helpText(spec, spec.flags);
    },
    async run(argv) {
      const parsed = parseCommand(spec, spec.flags, argv);
      if (parsed.help) {
        out(helpText(spec, spec.flags).trimEnd());
        return EXIT.ok;
      }
      const paths: Record<string, { path: string; role: PathRole }> = {};
      for (const [i, p] of (spec.positionals ?? []).entries()) {
        const given = parsed.positionals[i];
        if (p.path !== undefined && given !== undefined) paths[p.name] = { path: given, role: p.path };
      }
      try {
        return await spec.action(parsed.values, parsed.positionals);
      } catch (err) {
        throw inFlagTermsOfPaths(err, spec.flags, parsed.values, paths);
      }
    },
  };
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
