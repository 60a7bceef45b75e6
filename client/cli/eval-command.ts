/**
 * `--eval-cmd`: a party's own evaluation harness, run as a shell command for
 * each candidate of a DPA search (`dppa push --eval-cmd`, `dppa evaluate`).
 *
 * `{model}` in the command is replaced by the candidate's checkpoint folder,
 * quoted for the shell; the candidate is also described in the environment
 * (`DPPA_CANDIDATE_KIND` = dense|amplified, `DPPA_FACTORS` = f1,f2,…). The
 * command's stderr is passed through, its stdout copied to stderr, and the last
 * line of its stdout must be a JSON object `{ "task": score, … }`.
 */
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { EvaluatorKind, type Job } from '../../proto/gen/dppa/v1/jobs.js';
import { checkScores } from '../../proto/scores.js';
import type { DppaClient } from '../sdk/client.js';
import { DEFAULT_EVALUATION_RETRIES, type EvaluateFn, type EvaluateResult } from '../sdk/evaluate.js';
import { note, out } from './command.js';
import { number, text } from '../../proto/cli/flag-table.js';
import { UsageError } from './exit-codes.js';
import type { ProgressLine } from './progress.js';

const EVALUATION = 'DPA evaluation (federated factor search)';

/** The evaluation flags. */
export const evalFlags = {
  'eval-cmd': text(
    'CMD',
    'serve the job\'s DPA evaluation requests with this shell command: {model} is replaced by the candidate\'s checkpoint folder (quoted); the last line of its stdout must be JSON {"task": score, ...}, higher is better; DPPA_CANDIDATE_KIND and DPPA_FACTORS describe the candidate',
    { group: EVALUATION },
  ),
  'eval-retries': number(
    'N',
    `run a failing --eval-cmd again up to N more times (default ${DEFAULT_EVALUATION_RETRIES}); if it still fails, the server stops this party's search with its last stderr lines (the job and the other parties' work are kept): fix the command and run dppa evaluate to resume`,
    { min: 0, max: 100, integer: true },
    { group: EVALUATION },
  ),
  'work-dir': text(
    'DIR',
    'where candidates are written (DIR/candidate, replaced for each) and the pruned delta is kept (DIR/delta.dppa); default dppa-eval-JOB-PARTY',
    {
      group: EVALUATION,
      path: 'folder',
    },
  ),
};

/** Longest stdout kept from one run of the command: only its last line matters. */
const MAX_STDOUT_TAIL = 1024 * 1024;

/** Lines of a failed command's stderr quoted in its error, and the longest each may be. */
const STDERR_LINES = 5;
const STDERR_LINE_CHARS = 300;

/** Quotes a string for a POSIX shell. */
export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

/** The default working folder of a party's evaluations. */
export function defaultWorkDir(jobId: string, party: string): string {
  return resolve(`dppa-eval-${jobId}-${party}`);
}

/** The delta kept for evaluation inside a working folder. */
export function keptDeltaPath(workDir: string): string {
  return join(workDir, 'delta.dppa');
}

/**
 * An evaluation callback that runs `template` through the shell.
 * @throws UsageError if `template` lacks `{model}`.
 */
export function commandEvaluator(template: string): EvaluateFn {
  if (!template.includes('{model}'))
    throw new UsageError(
      '--eval-cmd: the command must contain {model}, which is replaced by the folder of the checkpoint to evaluate',
    );
  return (modelDir, candidate, signal) =>
    runCommand(
      template.replaceAll('{model}', shellQuote(modelDir)),
      { DPPA_CANDIDATE_KIND: candidate.kind, DPPA_FACTORS: candidate.factors.join(',') },
      signal,
    );
}

/**
 * Runs one evaluation command and parses the last line of its stdout.
 * @throws Error when it fails, is killed, or its last line is not a JSON object of finite numbers.
 */
async function runCommand(
  command: string,
  env: Record<string, string>,
  signal: AbortSignal,
): Promise<Record<string, number>> {
  return parseScores(await stdoutOf(command, env, signal));
}

/**
 * Runs a shell command, its stderr passed through and its stdout copied to stderr.
 * @returns The end of its stdout (the last {@link MAX_STDOUT_TAIL} characters).
 * @throws Error when it cannot start, exits non-zero or is killed, quoting its last stderr lines; the signal's reason when aborted.
 */
function stdoutOf(command: string, env: Record<string, string>, signal: AbortSignal): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    // Its own process group, so that an abort stops whatever the shell started too.
    const child = spawn(command, {
      shell: true,
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...env },
    });
    let tail = '';
    const stderr = new TailLines(STDERR_LINES, STDERR_LINE_CHARS);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (text: string) => {
      process.stderr.write(text);
      tail = (tail + text).slice(-MAX_STDOUT_TAIL);
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (text: string) => {
      process.stderr.write(text);
      stderr.add(text);
    });
    const kill = (): void => {
      try {
        process.kill(-child.pid!, 'SIGTERM');
      } catch {
        // Already gone.
      }
    };
    signal.addEventListener('abort', kill, { once: true });
    child.on('error', (err) => {
      signal.removeEventListener('abort', kill);
      reject(new Error(`cannot run the evaluation command: ${err.message}`, { cause: err }));
    });
    child.on('close', (code, killedBy) => {
      signal.removeEventListener('abort', kill);
      if (signal.aborted) reject(signal.reason as Error);
      else if (code === 0) resolvePromise(tail);
      else {
        const lines = stderr.lines();
        const quoted =
          lines.length === 0
            ? '; it wrote nothing to stderr'
            : `; its last stderr lines: ${lines.map((l) => JSON.stringify(l)).join(' ')}`;
        reject(
          new Error(
            `the evaluation command ${killedBy === null ? `exited with code ${code}` : `was killed by ${killedBy}`}: ${command}${quoted}`,
          ),
        );
      }
    });
  });
}

/** The last few non-empty lines of a stream, each cut to a bounded length, whatever the stream's size. */
export class TailLines {
  private kept: string[] = [];
  private partial = '';

  constructor(
    private readonly count: number,
    private readonly lineChars: number,
  ) {}

  /** Takes more text. */
  add(text: string): void {
    const parts = (this.partial + text).split('\n');
    // The unfinished last line, bounded: a stream without newlines must not grow it without end.
    this.partial = parts.pop()!.slice(-this.lineChars * 2);
    for (const line of parts) this.keep(line);
  }

  /** The last lines, oldest first (an unfinished last line included). */
  lines(): string[] {
    const last = this.partial.trim();
    return last === '' ? [...this.kept] : [...this.kept, this.cut(last)].slice(-this.count);
  }

  private keep(line: string): void {
    const t = line.trim();
    if (t === '') return;
    this.kept.push(this.cut(t));
    if (this.kept.length > this.count) this.kept.shift();
  }

  private cut(line: string): string {
    return line.length <= this.lineChars ? line : `…${line.slice(-this.lineChars)}`;
  }
}

/**
 * The scores on the last non-empty line of a command's output.
 * @throws Error quoting the line when it is not a JSON object of finite numbers.
 */
export function parseScores(stdout: string): Record<string, number> {
  const line = stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .at(-1);
  const bad = (why: string): Error =>
    new Error(
      `the last line of the evaluation command's output must be a JSON object {"task": score, ...}, but ${why}`,
    );
  if (line === undefined) throw bad('it printed nothing');
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch {
    throw bad(`it is ${JSON.stringify(line.slice(0, 200))}`);
  }
  try {
    return checkScores(parsed);
  } catch (err) {
    throw bad(`${(err as Error).message}: ${JSON.stringify(line.slice(0, 200))}`);
  }
}

/**
 * Checks before anything is sent that the job will ask this party for evaluations.
 * @throws UsageError when it will not (no search, or the party's evaluator runs on the server).
 */
export function requireRemoteSearch(job: Job, party: string): void {
  const search = job.dpa?.search;
  if (search === undefined)
    throw new UsageError(
      `--eval-cmd: job ${job.id} does not search its factors (its DPA is ${job.dpa?.fixed !== undefined ? 'fixed' : 'off'}): there is nothing to evaluate`,
    );
  if ((search.partyEvaluator[party] ?? search.evaluator) === EvaluatorKind.EVALUATOR_KIND_ONNX) {
    throw new UsageError(
      `--eval-cmd: job ${job.id} scores party ${party}'s candidates on the server (evaluator onnx): there is nothing to evaluate here`,
    );
  }
}

/** What {@link serveEvaluations} needs. */
export interface ServeOptions {
  jobId: string;
  /** `--eval-retries`; the SDK's default when undefined. */
  retries: number | undefined;
  party: string;
  base: string;
  finetuned: string;
  delta: string;
  workDir: string;
  command: string;
  json: boolean;
}

/** Serves the party's evaluation requests with the command until its search is over, telling the user as it goes. */
export async function serveEvaluations(
  client: DppaClient,
  o: ServeOptions,
  signal: AbortSignal,
  progress: ProgressLine,
): Promise<EvaluateResult> {
  const say = o.json ? note : out;
  say(
    `serving the DPA evaluation requests of job ${o.jobId} for party ${o.party} (candidates in ${join(o.workDir, 'candidate')})`,
  );
  const result = await client.evaluate(
    {
      jobId: o.jobId,
      party: o.party,
      base: o.base,
      finetuned: o.finetuned,
      delta: o.delta,
      workDir: o.workDir,
      evaluate: commandEvaluator(o.command),
      ...(o.retries === undefined ? {} : { retries: o.retries }),
    },
    {
      signal,
      onProgress: (e) => {
        progress.done();
        const what = (c: { kind: string; factors: number[] }): string =>
          c.kind === 'dense' ? 'dense fine-tuned model' : `factors ${c.factors.join(', ')}`;
        if (e.type === 'request')
          say(`evaluating ${what(e.candidate)}${e.cached ? ' (result kept from before the reconnection)' : ''}`);
        else if (e.type === 'answered') say(`  scores ${JSON.stringify(e.scores)}`);
        else if (e.type === 'retrying')
          note(
            `  ${e.error instanceof Error ? e.error.message : String(e.error)}; attempt ${e.attempt} of ${1 + (o.retries ?? DEFAULT_EVALUATION_RETRIES)}`,
          );
        else if (e.type === 'reconnecting')
          note(
            `connection lost (${e.error instanceof Error ? e.error.message : String(e.error)}); reconnecting in ${(e.delayMs / 1000).toFixed(1)} s`,
          );
      },
    },
  );
  say(`party ${o.party}: search over (${result.evaluated} candidate(s) evaluated, ${result.answered} answer(s) sent)`);
  return result;
}
