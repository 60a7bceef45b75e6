import { resolve } from 'node:path';
import { parse, num, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EVAL_HELP, defaultWorkDir, evalFlags, evalRetries, keptDeltaPath, requireRemoteSearch, serveEvaluations } from '../eval-command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { formatBytes } from '../progress.js';
import { pruneFlags, pruneSettings } from '../prune-flags.js';
import { PARTY_TOKEN_HELP, SERVER_HELP, clientOptions, partyToken, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';
import type { PushOptions } from '../../sdk/push.js';

const help = `Usage: dppa push --server HOST:PORT --job ID --party P --token T --base DIR --finetuned DIR [pruning options]
       dppa push --server HOST:PORT --job ID --party P --token T --delta FILE.dppa
       dppa push ... --eval-cmd 'CMD {model}' [--work-dir DIR]

Uploads this party's pruned delta to a job. With --base and --finetuned the
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

Required:
  --job ID                 the job's id
  --party P                this party's name in the job
  --base DIR               base checkpoint (the job's base), with --finetuned
  --finetuned DIR          this party's fine-tuned checkpoint
    or
  --delta FILE             a .dppa file pruned at the job's rate and method
  --keep-delta FILE        with --base/--finetuned: prune into FILE first (kept), then upload it;
                           a FILE that fits the job is uploaded as it is

Pruning (with --base/--finetuned; see dppa prune --help):
  --rate R                 must equal the job's rate (default: the job's)
  --method M               must equal the job's method (default: the job's)
  --levels, --outside, --significance, --lambda, --layer-outlier-factor,
  --linear-outlier-factor, --layer-pattern, --seed, --dare-rescale, --value-dtype,
  --vocab-mismatch, --workers   as in dppa prune

DPA evaluation (federated factor search):
${EVAL_HELP}

${SERVER_HELP}
${PARTY_TOKEN_HELP}

Output:
  --json                   print the server's final upload state as JSON (with --eval-cmd, then
                           { "evaluated": N, "answered": N } when the search is over; progress on stderr)
  -h, --help               this text

Exit codes: 0 ok (the server holds the whole upload; with --eval-cmd, the search is over), 2 bad
command line, 3 bad or mismatched checkpoints or delta (another base, rate or method than the job's),
4 the server refused or failed (or the job no longer collects, or it failed during the search),
5 the evaluation command kept failing (this party's search stopped with its message; fix it and run
dppa evaluate to resume), 130 interrupted (run again to resume).
`;

/** `dppa push`: see the help text above. */
export const pushCommand: Command = {
  name: 'push',
  summary: "upload this party's pruned delta to a job (resumable)",
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...partyTokenFlags,
      job: { type: 'string' },
      party: { type: 'string' },
      base: { type: 'string' },
      finetuned: { type: 'string' },
      delta: { type: 'string' },
      'keep-delta': { type: 'string' },
      rate: { type: 'string' },
      ...pruneFlags,
      ...evalFlags,
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    const party = required(v.party, 'party');
    const command = v['eval-cmd'];
    if (command === undefined && v['work-dir'] !== undefined) throw new UsageError('--work-dir goes with --eval-cmd');
    if (command === undefined && v['eval-retries'] !== undefined) throw new UsageError('--eval-retries goes with --eval-cmd');
    const workDir = resolve(v['work-dir'] ?? defaultWorkDir(jobId, party));
    let source: PushOptions;
    if (v.delta !== undefined) {
      const pruning = Object.keys(pruneFlags).filter((k) => v[k as keyof typeof pruneFlags] !== undefined);
      // With --eval-cmd, --base and --finetuned build the candidates rather than a delta.
      const building = command === undefined ? [...(v.base !== undefined ? ['--base'] : []), ...(v.finetuned !== undefined ? ['--finetuned'] : [])] : [];
      const extra = [...building, ...(v['keep-delta'] !== undefined ? ['--keep-delta'] : []), ...(v.rate !== undefined ? ['--rate'] : []), ...pruning.map((k) => `--${k}`)];
      if (extra.length > 0) throw new UsageError(`--delta sends a file as it is: drop ${extra.join(', ')}`);
      source = { jobId, party, delta: v.delta };
    } else {
      if (v.base === undefined && v.finetuned === undefined) throw new UsageError('give --base and --finetuned (to prune on the fly), or --delta FILE.dppa');
      source = { jobId, party, base: required(v.base, 'base'), finetuned: required(v.finetuned, 'finetuned'), ...pruneSettings(v) };
      const rate = num(v.rate, 'rate', { min: 0, below: 1 });
      if (rate !== undefined) source.rate = rate;
      const keep = v['keep-delta'] ?? (command === undefined ? undefined : keptDeltaPath(workDir));
      if (keep !== undefined) source.keepDelta = resolve(keep);
    }
    const evaluation =
      command === undefined
        ? undefined
        : { jobId, party, base: required(v.base, 'base'), finetuned: required(v.finetuned, 'finetuned'), delta: source.delta ?? source.keepDelta!, workDir, command, retries: evalRetries(v['eval-retries']), json: v.json === true };
    return withClient(clientOptions(v, partyToken(v)), async (client, signal, progress) => {
      if (evaluation !== undefined) requireRemoteSearch(await client.getJob(jobId, { signal }), party);
      const state = await client.push(source, {
        signal,
        onProgress: (p) => {
          if (p.phase === 'prepare') {
            progress.update('significance', p.tensorsDone, p.tensorsTotal, p.tensor, 'count');
          } else {
            const retry = p.attempt > 1 ? ` (attempt ${p.attempt})` : '';
            progress.update('upload      ', p.tensorsDone, p.tensorsTotal, `${formatBytes(p.bytesSent)} sent${retry} ${p.tensor}`, 'count');
          }
        },
      });
      progress.done();
      if (v.json === true) {
        out(JSON.stringify({ ...state, bytesReceived: Number(state.bytesReceived) }));
      } else {
        out(`party ${state.party}: upload to job ${state.jobId} complete (${state.tensorsReceived.length}/${state.tensorsExpected} tensors, ${formatBytes(Number(state.bytesReceived))} held by the server)`);
      }
      if (evaluation !== undefined) {
        const result = await serveEvaluations(client, evaluation, signal, progress);
        if (evaluation.json) out(JSON.stringify(result));
      }
      return EXIT.ok;
    });
  },
};
