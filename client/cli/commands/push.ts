import { resolve } from 'node:path';
import { number, text } from '../../../proto/cli/flag-table.js';
import { defineCommand, note, out } from '../command.js';
import {
  commandEvaluator,
  defaultWorkDir,
  evalFlags,
  keptDeltaPath,
  requireRemoteSearch,
  serveEvaluations,
} from '../eval-command.js';
import { Privacy } from '../../../proto/gen/dppa/v1/jobs.js';
import type { SecureProgress } from '../../sdk/secure-push.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { jsonFlag } from '../job-id-flag.js';
import { formatBytes } from '../progress.js';
import { methodFlag, pruneFlags, pruneSettings } from '../prune-flags.js';
import { clientOptions, partyToken, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';
import type { PushOptions } from '../../sdk/push.js';

const REQUIRED = 'Required';
const PRUNING = 'Pruning (with --base/--finetuned; see dppa prune --help)';

/** The pruning flags of push: those of prune, under push's heading, --rate and --method defaulting to the job's. */
const pushPruneFlags = Object.fromEntries(
  Object.entries(pruneFlags).map(([k, f]) => [k, { ...f, group: PRUNING }]),
) as typeof pruneFlags;

/** `dppa push`: see its help text. */
export const pushCommand = defineCommand({
  name: 'push',
  summary: "upload this party's pruned delta to a job (resumable)",
  usage: `--server HOST:PORT --job ID --party P --token T --base DIR --finetuned DIR [pruning options]
dppa push --server HOST:PORT --job ID --party P --token T --delta FILE.dppa
dppa push ... --eval-cmd 'CMD {model}' [--work-dir DIR]`,
  description: `Uploads this party's pruned delta to a job. With --base and --finetuned the
delta is pruned on the fly at the job's rate and method (the next tensors are
pruned while earlier ones are on the wire); with --delta a file made by
\`dppa prune\` is sent. Only tensors the server does not hold yet are sent: after
a dropped connection (or Ctrl-C and a new run) the upload resumes where it stopped.

With --eval-cmd, for a job whose DPA factors are searched with the parties'
own evaluations (--evaluator remote), the command then stays connected and
scores each candidate the server proposes with CMD, until this party's search
is over (docs/dpa.md). The delta is then pruned into a file first (--keep-delta,
default DIR/delta.dppa) so that the candidates are built from the very delta
uploaded; --base and --finetuned are needed (also with --delta) to build them.
After a disconnection, \`dppa evaluate\` rejoins the search without pushing again.

For a secure job (dppa job create --privacy secure) the same flags do the
party's side of secure aggregation (docs/privacy.md): the delta is pruned into
--work-dir, its factors are searched there with --eval-cmd (factors 1 without
it), its support (positions only) is uploaded, and the command stays through
the key, share, masked-upload and unmask rounds. The party's private keys and
seed are kept in --work-dir (mode 0600, never sent): run the command again to
resume after an interruption.`,
  flags: {
    job: text('ID', "the job's id", { required: true, group: REQUIRED }),
    party: text('P', "this party's name in the job", { required: true, group: REQUIRED }),
    base: text('DIR', "base checkpoint (the job's base), with --finetuned", { group: REQUIRED, path: 'input' }),
    finetuned: text('DIR', "this party's fine-tuned checkpoint", { group: REQUIRED, path: 'input' }),
    delta: text('FILE', "or: a .dppa file pruned at the job's rate and method", { group: REQUIRED, path: 'input' }),
    'keep-delta': text(
      'FILE',
      'with --base/--finetuned: prune into FILE first (kept), then upload it; a FILE that fits the job is uploaded as it is',
      { group: REQUIRED },
    ),
    rate: number('R', "must equal the job's rate (default: the job's)", { min: 0, below: 1 }, { group: PRUNING }),
    ...pushPruneFlags,
    method: { ...methodFlag, group: PRUNING, help: "must equal the job's method (default: the job's)" },
    ...evalFlags,
    ...serverFlags,
    ...partyTokenFlags,
    ...jsonFlag(
      'print the server\'s final upload state as JSON (with --eval-cmd, then { "evaluated": N, "answered": N } when the search is over; progress on stderr, for a secure job one JSON object a line: {"step": "search" | "factors" | "union" | ..., ...})',
    ),
  },
  after: `Exit codes: 0 ok (the server holds the whole upload; with --eval-cmd, the search is over), 2 bad
command line, 3 missing, bad or mismatched checkpoints or delta (another base, rate or method than the job's),
4 the server refused or failed (or the job no longer collects, or it failed during the search),
5 the evaluation command kept failing (this party's search stopped with its message; fix it and run
dppa evaluate to resume), 130 interrupted (run again to resume).`,
  async action(v) {
    const { job: jobId, party } = v;
    const command = v['eval-cmd'];
    if (command === undefined && v['eval-retries'] !== undefined)
      throw new UsageError('--eval-retries goes with --eval-cmd');
    const workDir = resolve(v['work-dir'] ?? defaultWorkDir(jobId, party));
    let source: PushOptions;
    if (v.delta !== undefined) {
      const pruning = Object.keys(pruneFlags).filter((k) => v[k as keyof typeof pruneFlags] !== undefined);
      // With --eval-cmd, --base and --finetuned build the candidates rather than a delta.
      const building =
        command === undefined
          ? [...(v.base !== undefined ? ['--base'] : []), ...(v.finetuned !== undefined ? ['--finetuned'] : [])]
          : [];
      const extra = [
        ...building,
        ...(v['keep-delta'] !== undefined ? ['--keep-delta'] : []),
        ...(v.rate !== undefined ? ['--rate'] : []),
        ...pruning.map((k) => `--${k}`),
      ];
      if (extra.length > 0) throw new UsageError(`--delta sends a file as it is: drop ${extra.join(', ')}`);
      source = { jobId, party, delta: v.delta };
    } else {
      if (v.base === undefined && v.finetuned === undefined)
        throw new UsageError('give --base and --finetuned (to prune on the fly), or --delta FILE.dppa');
      source = {
        jobId,
        party,
        base: need(v.base, 'base', 'with --finetuned'),
        finetuned: need(v.finetuned, 'finetuned', 'with --base'),
        ...pruneSettings(v),
      };
      if (v.rate !== undefined) source.rate = v.rate;
      const keep = v['keep-delta'] ?? (command === undefined ? undefined : keptDeltaPath(workDir));
      if (keep !== undefined) source.keepDelta = resolve(keep);
    }
    const evaluation =
      command === undefined
        ? undefined
        : {
            jobId,
            party,
            base: need(v.base, 'base', 'with --eval-cmd'),
            finetuned: need(v.finetuned, 'finetuned', 'with --eval-cmd'),
            delta: source.delta ?? source.keepDelta!,
            workDir,
            command,
            retries: v['eval-retries'],
            json: v.json,
          };
    return withClient(clientOptions(v, partyToken(v)), async (client, signal, progress) => {
      const job = await client.getJob(jobId, { signal });
      const secure = job.privacy === Privacy.PRIVACY_SECURE;
      if (secure) {
        // The party's side of secure aggregation: its own search with --eval-cmd, its state in --work-dir.
        source.secure = {
          workDir,
          ...(command === undefined ? {} : { evaluate: commandEvaluator(command) }),
          ...(v['eval-retries'] === undefined ? {} : { retries: v['eval-retries'] }),
          ...(evaluation !== undefined && source.delta !== undefined
            ? { base: evaluation.base, finetuned: evaluation.finetuned }
            : {}),
        };
      } else {
        if (command === undefined && v['work-dir'] !== undefined)
          throw new UsageError('--work-dir goes with --eval-cmd (or a secure job)');
        if (evaluation !== undefined) requireRemoteSearch(job, party);
      }
      const state = await client.push(source, {
        signal,
        onSecure: (p) => {
          const line = v.json ? secureJson(p) : secureLine(p);
          if (line === undefined) return;
          progress.done();
          (v.json ? note : out)(line);
        },
        onProgress: (p) => {
          if (p.phase === 'prepare') {
            progress.update('significance', p.tensorsDone, p.tensorsTotal, p.tensor, 'count');
          } else {
            const retry = p.attempt > 1 ? ` (attempt ${p.attempt})` : '';
            progress.update(
              'upload      ',
              p.tensorsDone,
              p.tensorsTotal,
              `${formatBytes(p.bytesSent)} sent${retry} ${p.tensor}`,
              'count',
            );
          }
        },
      });
      progress.done();
      if (v.json) {
        out(JSON.stringify({ ...state, bytesReceived: Number(state.bytesReceived) }));
      } else if (secure) {
        out(
          `party ${state.party}: secure push to job ${state.jobId} complete (support held, masked vector sent, unmask answered)`,
        );
      } else {
        out(
          `party ${state.party}: upload to job ${state.jobId} complete (${state.tensorsReceived.length}/${state.tensorsExpected} tensors, ${formatBytes(Number(state.bytesReceived))} held by the server)`,
        );
      }
      if (evaluation !== undefined && !secure) {
        const result = await serveEvaluations(client, evaluation, signal, progress);
        if (evaluation.json) out(JSON.stringify(result));
      }
      return EXIT.ok;
    });
  },
});

/** A secure push's progress as a line for the user (undefined: not worth a line). */
function secureLine(p: SecureProgress): string | undefined {
  switch (p.step) {
    case 'search': {
      const e = p.event;
      const what =
        e.candidate.kind === 'dense' ? 'dense fine-tuned model' : `factors ${e.candidate.factors.join(', ')}`;
      if (e.type === 'evaluating') return `local search: evaluating ${what}`;
      if (e.type === 'scored')
        return `  scores ${JSON.stringify(e.scores)}, domain ratio ${(100 * e.domainRatio).toFixed(2)}%`;
      if (e.type === 'recorded') return `local search: ${what} (scored before, from the record)`;
      return `  ${e.error instanceof Error ? e.error.message : String(e.error)}; attempt ${e.attempt}`;
    }
    case 'factors':
      return `factors ${p.factors.join(', ')}${p.domainRatio === undefined ? '' : ` (domain ratio ${(100 * p.domainRatio).toFixed(2)}%)`}`;
    case 'waiting':
      return `waiting for the other parties (phase ${p.phase})`;
    case 'keys':
      return `keys advertised (party number ${p.index})`;
    case 'shares':
      return `shares sent to ${p.sent} parties`;
    case 'received':
      return `shares received from parties ${p.peers.join(', ')}`;
    case 'union':
      return `union of the supports: ${p.words} positions`;
    case 'masked':
      return undefined;
    case 'maskedComplete':
      return `masked vector held by the server (${p.wordsTotal} words${p.clipped ? `; ${p.clipped} value(s) clipped to the bound` : ''})`;
    case 'unmasked':
      return `unmask answered (survivors ${p.survivors.join(', ')}${p.dropouts.length > 0 ? `; dropped ${p.dropouts.join(', ')}` : ''})`;
    case 'excluded':
      return `excluded in phase ${p.phase}`;
  }
}

/**
 * A secure push's progress as one JSON line for a program (--json, on stderr): `{"step": …}` with the step's fields
 * as the SDK reports them (SecureProgress); a search step flattened to `{"step": "search", "type", "candidate":
 * "dense" | [factors], "scores", "domainRatio"}` (a fraction). Undefined: not worth a line (each masked chunk).
 */
function secureJson(p: SecureProgress): string | undefined {
  if (p.step === 'masked') return undefined;
  if (p.step !== 'search') return JSON.stringify(p);
  const e = p.event;
  return JSON.stringify({
    step: 'search',
    type: e.type,
    candidate: e.candidate.kind === 'dense' ? 'dense' : e.candidate.factors,
    ...(e.type === 'scored' ? { scores: e.scores, domainRatio: e.domainRatio } : {}),
    ...(e.type === 'retrying'
      ? { attempt: e.attempt, error: e.error instanceof Error ? e.error.message : String(e.error) }
      : {}),
  });
}

/** A flag that the other flags given make necessary. */
function need(value: string | undefined, flag: string, why: string): string {
  if (value === undefined) throw new UsageError(`--${flag} is required ${why}`);
  return value;
}
