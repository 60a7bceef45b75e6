import { parse, num, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { formatBytes } from '../progress.js';
import { pruneFlags, pruneSettings } from '../prune-flags.js';
import { PARTY_TOKEN_HELP, SERVER_HELP, clientOptions, partyToken, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';
import type { PushOptions } from '../../sdk/push.js';

const help = `Usage: dppa push --server HOST:PORT --job ID --party P --token T --base DIR --finetuned DIR [pruning options]
       dppa push --server HOST:PORT --job ID --party P --token T --delta FILE.dppa

Uploads this party's pruned delta to a job. With --base and --finetuned the
delta is pruned on the fly at the job's rate and method (the next tensors are
pruned while earlier ones are on the wire); with --delta a file made by
\`dppa prune\` is sent. Only tensors the server does not hold yet are sent: after
a dropped connection (or Ctrl-C and a new run) the upload resumes where it stopped.

Required:
  --job ID                 the job's id
  --party P                this party's name in the job
  --base DIR               base checkpoint (the job's base), with --finetuned
  --finetuned DIR          this party's fine-tuned checkpoint
    or
  --delta FILE             a .dppa file pruned at the job's rate and method

Pruning (with --base/--finetuned; see dppa prune --help):
  --rate R                 must equal the job's rate (default: the job's)
  --method M               must equal the job's method (default: the job's)
  --levels, --outside, --significance, --lambda, --layer-outlier-factor,
  --linear-outlier-factor, --layer-pattern, --seed, --dare-rescale, --value-dtype,
  --vocab-mismatch, --workers   as in dppa prune

${SERVER_HELP}
${PARTY_TOKEN_HELP}

Output:
  --json                   print the server's final upload state as JSON
  -h, --help               this text

Exit codes: 0 ok (the server holds the whole upload), 2 bad command line, 3 bad or mismatched
checkpoints or delta (another base, rate or method than the job's), 4 the server refused or
failed (or the job no longer collects), 130 interrupted (run again to resume).
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
      rate: { type: 'string' },
      ...pruneFlags,
      json: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    });
    if (v.help === true) {
      out(help);
      return EXIT.ok;
    }
    const jobId = required(v.job, 'job');
    const party = required(v.party, 'party');
    let source: PushOptions;
    if (v.delta !== undefined) {
      const pruning = Object.keys(pruneFlags).filter((k) => v[k as keyof typeof pruneFlags] !== undefined);
      if (v.base !== undefined || v.finetuned !== undefined || v.rate !== undefined || pruning.length > 0) {
        throw new UsageError(`--delta sends a file as it is: drop ${[...(v.base !== undefined ? ['--base'] : []), ...(v.finetuned !== undefined ? ['--finetuned'] : []), ...(v.rate !== undefined ? ['--rate'] : []), ...pruning.map((k) => `--${k}`)].join(', ')}`);
      }
      source = { jobId, party, delta: v.delta };
    } else {
      if (v.base === undefined && v.finetuned === undefined) throw new UsageError('give --base and --finetuned (to prune on the fly), or --delta FILE.dppa');
      source = { jobId, party, base: required(v.base, 'base'), finetuned: required(v.finetuned, 'finetuned'), ...pruneSettings(v) };
      const rate = num(v.rate, 'rate', { min: 0, below: 1 });
      if (rate !== undefined) source.rate = rate;
    }
    return withClient(clientOptions(v, partyToken(v)), async (client, signal, progress) => {
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
      return EXIT.ok;
    });
  },
};
