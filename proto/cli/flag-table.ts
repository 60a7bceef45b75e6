/**
 * The command lines of `dppa`: one declarative table of flags per command,
 * from which parsing (commander), validation and `--help` all come, so that
 * each flag is declared once. Shared by the client's commands and `dppa serve`;
 * how its errors read: docs/cli.md, "For contributors".
 */
import { existsSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { Command, CommanderError, Help, Option } from 'commander';
import { closest } from './did-you-mean.js';
import { messageOf } from '../errors.js';

/** A bad command line: unknown flag, missing flag or value, value out of range. Exit code 2. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** An input path given by a flag does not exist. The client's exit code 3 (bad input data); `dppa serve`'s 2. */
export class InputPathError extends Error {
  override name = 'InputPathError';
}

/** What a path flag names: read (`input`), written and refused when it exists without --overwrite (`output`), or a folder used as it is (`folder`). */
export type PathRole = 'input' | 'output' | 'folder';

/** One flag: how its text becomes a value, and how `--help` tells it. */
export interface Flag<T = unknown, R extends boolean = boolean> {
  /** Placeholder of the value in `--help` (`DIR`); absent for a switch. */
  readonly arg?: string;
  /** Its `--help` text; `\n` starts a new line, aligned with the first. */
  readonly help: string;
  /** Heading of its `--help` section (`Required`, `Connection`). @default 'Options' */
  readonly group?: string;
  readonly required: R;
  /** May be given several times; the values come as an array. */
  readonly repeatable?: boolean;
  readonly path?: PathRole;
  /** The option of a programmatic API it feeds (`grpcPort`), so that that API's errors are told with the flag. */
  readonly option?: string;
  /** For an `output`: said when it exists, before the `--overwrite` hint (`pull creates a new folder`). */
  readonly whenExists?: string;
  /** Converts the text of the flag; throws a message (without the flag's name) when it is wrong. */
  convert(text: string): T;
}

/** A command's flags, keyed by their long name without dashes (`rate`, `tls-ca`). */
export type FlagTable = Record<string, Flag>;

/** The values of a table: required flags always present, switches `true`/`false`, repeatable ones arrays. */
export type FlagValues<F extends FlagTable> = {
  [K in keyof F]: F[K] extends Flag<infer T, infer R>
    ? F[K] extends { repeatable: true }
      ? T[] | undefined
      : R extends true
        ? T
        : T | undefined
    : never;
};

/** Where a flag goes in `--help` and what it names. */
export interface FlagOptions {
  group?: string;
  required?: boolean;
  path?: PathRole;
  option?: string;
  whenExists?: string;
}

/** Options of a required flag. (Overloads rather than a generic: a table's contextual type would widen a generic `required: true`.) */
type Required = FlagOptions & { required: true };

function flag<T>(arg: string | undefined, help: string, o: FlagOptions, convert: (text: string) => T): Flag<T, false> {
  // The overloads of the public constructors give the required ones their type.
  return { ...(arg === undefined ? {} : { arg }), help, required: (o.required ?? false) as false, ...pick(o), convert };
}

function pick(o: FlagOptions): Pick<Flag, 'group' | 'path' | 'option' | 'whenExists'> {
  const { group, path, option, whenExists } = o;
  return {
    ...(group === undefined ? {} : { group }),
    ...(path === undefined ? {} : { path }),
    ...(option === undefined ? {} : { option }),
    ...(whenExists === undefined ? {} : { whenExists }),
  };
}

/** A flag with a text value. */
export function text(arg: string, help: string, o: Required): Flag<string, true>;
export function text(arg: string, help: string, o?: FlagOptions): Flag<string, false>;
export function text(arg: string, help: string, o: FlagOptions = {}): Flag<string> {
  return flag(arg, help, o, (t) => {
    if (t === '') throw new Error('must not be empty');
    return t;
  });
}

/** A flag given several times (`--onnx-tasks a --onnx-tasks b`), its values as an array. */
export function repeatable(arg: string, help: string, o: FlagOptions = {}): Flag<string, false> & { repeatable: true } {
  return { ...text(arg, help, o), repeatable: true };
}

/** A switch: `true` when given, `false` otherwise. */
export function toggle(help: string, o: { group?: string; option?: string } = {}): Flag<boolean, true> {
  // Typed as required: its value is always there (false when not given).
  return { ...flag(undefined, help, o, () => true), required: false as true };
}

/** Limits of a number flag. */
export interface NumberRange {
  min?: number;
  max?: number;
  /** Values must be below this. */
  below?: number;
  integer?: boolean;
}

/** `expected a number ≥ 0 < 1`: what a range asks for. */
function wanted(range: NumberRange): string {
  return [
    range.integer === true ? 'an integer' : 'a number',
    range.min !== undefined ? `≥ ${range.min}` : '',
    range.max !== undefined ? `≤ ${range.max}` : '',
    range.below !== undefined ? `< ${range.below}` : '',
  ]
    .filter(Boolean)
    .join(' ');
}

/** A number checked against a range. @throws Error saying what was expected. */
export function toNumber(t: string, range: NumberRange = {}): number {
  const n = Number(t);
  const bad =
    t.trim() === '' ||
    !Number.isFinite(n) ||
    (range.integer === true && !Number.isSafeInteger(n)) ||
    (range.min !== undefined && n < range.min) ||
    (range.max !== undefined && n > range.max) ||
    (range.below !== undefined && n >= range.below);
  if (bad) throw new Error(`expected ${wanted(range)}, got ${JSON.stringify(t)}`);
  return n;
}

/** A number flag, checked against a range. */
export function number(arg: string, help: string, range: NumberRange, o: Required): Flag<number, true>;
export function number(arg: string, help: string, range?: NumberRange, o?: FlagOptions): Flag<number, false>;
export function number(arg: string, help: string, range: NumberRange = {}, o: FlagOptions = {}): Flag<number> {
  return flag(arg, help, o, (t) => toNumber(t, range));
}

/** A comma-separated list of numbers (`0.9,0.8`). */
export function numbers(
  arg: string,
  help: string,
  range: NumberRange = {},
  o: FlagOptions = {},
): Flag<number[], false> {
  return flag(arg, help, o, (t) => t.split(',').map((x) => toNumber(x, range)));
}

/** One of a fixed set of words. */
export function choice<C extends string>(
  arg: string,
  choices: readonly C[],
  help: string,
  o: FlagOptions = {},
): Flag<C, false> {
  return flag(arg, help, o, (t) => {
    if (!(choices as readonly string[]).includes(t))
      throw new Error(`expected one of ${choices.join(', ')}, got ${JSON.stringify(t)}`);
    return t as C;
  });
}

/** A flag whose text is converted by `convert` (a duration, a list of pairs). */
export function custom<T>(
  arg: string,
  help: string,
  convert: (text: string) => T,
  o: FlagOptions = {},
): Flag<T, false> {
  return flag(arg, help, o, convert);
}

/** A positional argument of a command (`dppa inspect FILE`). */
export interface Positional {
  /** As shown in `--help`: `FILE`. */
  name: string;
  help: string;
  path?: PathRole;
}

/** Everything `--help` shows of a command besides its flags. */
export interface CommandText {
  /** As typed after `dppa`: `prune`, `job create`. */
  name: string;
  /** What follows `Usage: dppa NAME` (further lines start with `dppa`, aligned by this module). */
  usage: string;
  /** The paragraphs after the usage line. */
  description?: string;
  /** Text after the flags: notes and the exit codes. */
  after?: string;
  /** Positional arguments, in order (all required). */
  positionals?: readonly Positional[];
}

/** Width `--help` wraps at. */
const HELP_WIDTH = 108;
/** Widest flag column of `--help`; longer flags push their text further on their own line. */
const TERM_WIDTH = 23;

/** `--help` in the project's layout: sections by group, descriptions aligned and wrapped. */
class FlagHelp extends Help {
  constructor() {
    super();
    this.helpWidth = HELP_WIDTH;
  }

  override optionTerm(option: Option): string {
    return option.flags.replace(/<([^>]*)>/g, '$1');
  }

  override argumentTerm(argument: { name(): string }): string {
    return argument.name();
  }

  override padWidth(): number {
    return TERM_WIDTH;
  }

  override formatItem(term: string, _termWidth: number, description: string): string {
    if (description === '') return `  ${term}`;
    const column = TERM_WIDTH + 4;
    const lines = description.split('\n').flatMap((l) => wrap(l, HELP_WIDTH - column));
    const head = term.length <= TERM_WIDTH ? `  ${term.padEnd(TERM_WIDTH)}  ` : `  ${term}  `;
    return `${head}${lines.join(`\n${' '.repeat(column)}`)}`;
  }
}

/** Word-wraps one line to `width` at its spaces (its own spacing kept), continuation lines keeping its indentation. */
function wrap(line: string, width: number): string[] {
  const indent = /^\s*/.exec(line)![0];
  const out: string[] = [];
  let rest = line;
  while (rest.length > width) {
    const cut = rest.lastIndexOf(' ', width);
    if (cut <= indent.length) break;
    out.push(rest.slice(0, cut).trimEnd());
    rest = indent + rest.slice(cut + 1).trimStart();
  }
  out.push(rest);
  return out;
}

/** A command whose `--help` uses {@link FlagHelp}. */
class FlagCommand extends Command {
  override createHelp(): Help {
    return Object.assign(new FlagHelp(), this.configureHelp());
  }
}

/** `-h, --help`, which every table gets. */
const HELP_FLAG = 'help';

/** The commander command of a table, and its options by flag name. */
function build(t: CommandText, flags: FlagTable): { cmd: Command; options: Map<string, Option> } {
  const cmd = new FlagCommand(`dppa ${t.name}`)
    .usage(t.usage.replaceAll('\n', `\n${' '.repeat('Usage: '.length)}`))
    .helpOption(false)
    .exitOverride()
    .allowExcessArguments(true)
    .configureOutput({ writeOut: () => undefined, writeErr: () => undefined, outputError: () => undefined });
  if (t.description !== undefined) cmd.description(t.description.trimEnd());
  for (const p of t.positionals ?? []) cmd.argument(`[${p.name}]`, p.help);
  const options = new Map<string, Option>();
  const groups = Object.values(flags).map((f) => f.group ?? 'Options');
  const entries: [string, Flag][] = [
    ...Object.entries(flags),
    [HELP_FLAG, toggle('this text', { group: groups.at(-1) ?? 'Options' })],
  ];
  for (const [name, f] of entries) {
    const o = new Option(
      `${name === HELP_FLAG ? '-h, ' : ''}--${name}${f.arg === undefined ? '' : ` <${f.arg}>`}`,
      f.help,
    ).helpGroup(`${f.group ?? 'Options'}:`);
    if (f.repeatable === true) o.argParser((v: string, prev: string[] | undefined) => [...(prev ?? []), v]);
    cmd.addOption(o);
    options.set(name, o);
  }
  return { cmd, options };
}

/** The full `--help` text of a command. */
export function helpText(t: CommandText, flags: FlagTable): string {
  const body = build(t, flags).cmd.helpInformation();
  return t.after === undefined ? body : `${body}\n${t.after.trim()}\n`;
}

/** What {@link parseCommand} returns. */
export type Parsed<F extends FlagTable> =
  { help: true } | { help: false; values: FlagValues<F>; positionals: string[] };

/** `--a, --b and --c`. */
function listed(names: string[]): string {
  return names.length === 1 ? names[0]! : `${names.slice(0, -1).join(', ')} and ${names.at(-1)!}`;
}

/**
 * Parses `argv` with a command's table: unknown flags, missing values, every
 * missing required flag and every bad value are reported together, one per
 * line, in one UsageError. An `output` path that exists is refused unless the
 * table's `--overwrite` is given.
 * @returns `{ help: true }` when `-h`/`--help` was given (print {@link helpText}).
 * @throws UsageError
 */
export function parseCommand<F extends FlagTable>(t: CommandText, flags: F, argv: readonly string[]): Parsed<F> {
  const { cmd, options } = build(t, flags);
  try {
    cmd.parse([...argv], { from: 'user' });
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err;
    throw new UsageError(commanderMessage(err, [...options.keys()]), { cause: err });
  }
  const raw = (name: string): unknown => cmd.getOptionValue(options.get(name)!.attributeName());
  if (raw(HELP_FLAG) === true) return { help: true };
  const problems: string[] = [];
  const wanted = t.positionals ?? [];
  const missing = [
    ...Object.entries(flags)
      .filter(([name, f]) => f.required && raw(name) === undefined)
      .map(([name]) => `--${name}`),
    ...wanted.slice(cmd.args.length).map((p) => p.name),
  ];
  if (missing.length > 0) problems.push(`${listed(missing)} ${missing.length === 1 ? 'is' : 'are'} required`);
  if (cmd.args.length > wanted.length) {
    const extra = cmd.args.slice(wanted.length);
    problems.push(
      `unexpected argument${extra.length === 1 ? '' : 's'} ${extra.map(strayArgument).join(' ')}${wanted.length === 0 ? ` (dppa ${t.name} takes flags only)` : ''}`,
    );
  }
  const values: Record<string, unknown> = {};
  for (const [name, f] of Object.entries(flags)) {
    const given = raw(name);
    if (given === undefined) {
      values[name] = f.arg === undefined ? false : undefined;
      continue;
    }
    try {
      values[name] =
        f.arg === undefined
          ? true
          : Array.isArray(given)
            ? given.map((g: string) => f.convert(g))
            : f.convert(given as string);
    } catch (err) {
      problems.push(`--${name}: ${messageOf(err)}`);
    }
  }
  for (const [name, f] of Object.entries(flags)) {
    const path = values[name];
    if (f.path !== 'output' || typeof path !== 'string' || !existsSync(path)) continue;
    if (!('overwrite' in flags))
      throw new Error(`dppa ${t.name}: the table has an output flag (--${name}) but no --overwrite`);
    if (values.overwrite !== true)
      problems.push(
        `--${name}: ${path} already exists${f.whenExists === undefined ? '' : `; ${f.whenExists}`}; pass --overwrite to replace it`,
      );
  }
  if (problems.length > 0) throw new UsageError(problems.join('\n'));
  return { help: false, values: values as FlagValues<F>, positionals: cmd.args.slice(0, wanted.length) };
}

/** A commander parse error in the project's words, with "did you mean" for a mistyped flag. */
function commanderMessage(err: CommanderError, names: string[]): string {
  if (err.code === 'commander.unknownOption') {
    const typed = /'([^']+)'/.exec(err.message)?.[1] ?? '';
    // `--tokn=SECRET`: the value after `=` may be a token; it is not repeated.
    return `Unknown option '${typed.replace(/=.*$/s, '=…')}'${didYouMeanFlag(typed, names)}`;
  }
  if (err.code === 'commander.optionMissingArgument') {
    const typed = /'(-[^ ']+)/.exec(err.message)?.[1] ?? 'a flag';
    return `${typed.replace(/^-h, /, '')} needs a value`;
  }
  return err.message.replace(/^error: /, '');
}

/** A stray positional as an error shows it: a short word as typed; anything longer (it may be a token) only by its length. */
function strayArgument(arg: string): string {
  return arg.length <= 12 && !arg.includes('=') ? JSON.stringify(arg) : `(${arg.length} characters)`;
}

function didYouMeanFlag(typed: string, names: string[]): string {
  const near = closest(
    typed.replace(/=.*$/, ''),
    names.map((n) => `--${n}`),
  );
  return near.length === 0 ? '' : ` (did you mean ${near.join(' or ')}?)`;
}

/** The text of a system error without its code and path: `no such file or directory`. */
function reason(err: NodeJS.ErrnoException): string {
  const m = /^[A-Z]+: ([^,]+)/.exec(err.message);
  return m?.[1] ?? err.code ?? err.message;
}

/** `p` is `root`, inside it, or a temporary sibling of it (`root.tmp-…`). */
function under(p: string, root: string): boolean {
  return p === root || p.startsWith(root + sep) || p.startsWith(`${root}.tmp-`) || p.startsWith(`${root}.old-`);
}

/**
 * An error raised while a command ran, told with the flag whose path it is
 * about: a missing input becomes an InputPathError naming the flag; a failure
 * to write an output a UsageError naming the flag and the output (not the
 * temporary file beside it). Anything else is returned unchanged.
 * @param paths - The path flags' values (and positionals) by flag name (`--out`) or argument name (`FILE`).
 */
export function inFlagTermsOfPaths(
  err: unknown,
  flags: FlagTable,
  values: Record<string, unknown>,
  positionals: Record<string, { path: string; role: PathRole }> = {},
): unknown {
  const e = err as NodeJS.ErrnoException;
  if (!(err instanceof Error) || typeof e.path !== 'string' || typeof e.code !== 'string') return err;
  const failed = resolve(e.path);
  const named = [
    ...Object.entries(flags).flatMap(([name, f]) =>
      f.path !== undefined && typeof values[name] === 'string'
        ? [{ name: `--${name}`, path: values[name], role: f.path }]
        : [],
    ),
    ...Object.entries(positionals).map(([name, p]) => ({ name, ...p })),
  ];
  for (const n of named) {
    const root = resolve(n.path);
    // A missing folder of an output is that output's failure too.
    if (!under(failed, root) && !(n.role === 'output' && failed === dirname(root))) continue;
    if (n.role === 'output') return new UsageError(`${n.name}: cannot write ${n.path}: ${reason(e)}`, { cause: err });
    if (n.role === 'input' && (e.code === 'ENOENT' || e.code === 'ENOTDIR'))
      return new InputPathError(`${n.name}: ${failed === root ? n.path : e.path} does not exist`, { cause: err });
    return new UsageError(`${n.name}: cannot use ${failed === root ? n.path : e.path}: ${reason(e)}`, { cause: err });
  }
  return err;
}
