import { DEFAULT_PRUNE_METHOD, PRUNE_METHODS } from '../../../proto/algorithm/index.js';
import { choice, number, text, toggle } from '../../../proto/cli/flag-table.js';
import { defineCommand, out } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { jsonFlag } from '../job-id-flag.js';
import {
  evaluatorFlags,
  parseDpa,
  parseEvaluator,
  parseParties,
  parsePrivacy,
  parseWeights,
  privacyFlags,
} from '../job-flags.js';
import { adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';
import type { CreateJobOptions } from '../../sdk/jobs.js';
import { MergeOutput } from '../../../proto/gen/dppa/v1/jobs.js';

const MERGE_OUTPUTS = {
  dense: MergeOutput.MERGE_OUTPUT_DENSE,
  patch: MergeOutput.MERGE_OUTPUT_PATCH,
  both: MergeOutput.MERGE_OUTPUT_BOTH,
} as const;
const OUTPUTS = ['dense', 'patch', 'both'] as const;

const REQUIRED = 'Required';
const JOB = 'Job';

/** `dppa job create`: see its help text. */
export const jobCreateCommand = defineCommand({
  name: 'job create',
  summary: 'create a merge job and print one token per party',
  usage: '--server HOST:PORT --base DIR --parties a,b,c --rate R [options]',
  description: `Creates a merge job on the server and prints its id and one token per party
(shown only now: hand each party its own token, e.g. with DPPA_TOKEN).

With --privacy secure --threshold T the server learns only the sum of the
parties' scaled deltas (secure aggregation, docs/privacy.md): each party runs
its factor search with its own evaluation and applies its factors in
dppa push, so --dpa search, the evaluator flags, --weights and
--sign-election are refused.`,
  flags: {
    base: text('DIR', "folder of the base checkpoint on the server's disk", { required: true, group: REQUIRED }),
    parties: text('a,b,c', "party names (letters, digits, '-', '_', at most 64 each)", {
      required: true,
      group: REQUIRED,
    }),
    rate: number(
      'R',
      'target pruning rate every party must use, in [0, 1)',
      { min: 0, below: 1 },
      { required: true, group: REQUIRED },
    ),
    method: choice(
      'M',
      PRUNE_METHODS,
      `pruning method every party must use: ${PRUNE_METHODS.join(', ')} (default dp)`,
      { group: JOB },
    ),
    dpa: text(
      'SPEC',
      `amplification of the partitions (default off):
  off                      every factor 1 (DP alone)
  fixed:F1,F2,...          the same factors for every party, partition 1 first
  fixed:a=F1,F2;b=F1,F2    factors per party (a leading F1,F2; sets the others)
  search[:K=V,...]         factors searched per party; settings:
                           method=whole|progressive (default whole),
                           tuner=greedy|golden,
                           start, step, upper, lower, budget, downward,
                           party-timeout (seconds a search waits for a
                           disconnected party, default 600)`,
      { group: JOB },
    ),
    'scale-outside-by-max': toggle("scale outside tensors by the party's largest factor (default 1)", { group: JOB }),
    weights: text('a=1,b=0.5', 'per-party merge weights (parties not named keep 1)', { group: JOB }),
    'sign-election': toggle('TIES-style sign election per entry before summing', { group: JOB }),
    'parties-may-download': toggle('let parties download the merged checkpoint with their own token', { group: JOB }),
    output: choice(
      'dense|patch|both',
      OUTPUTS,
      'what the merge writes (default both): the dense checkpoint, the merged patch (dppa pull --base / --patch), or both; patch skips the dense write',
      { group: JOB },
    ),
    label: text('TEXT', 'a label for people', { group: JOB }),
    'max-abs-value': number(
      'V',
      'largest magnitude an uploaded delta value may have, > 0 (default 1000, see docs/server.md); a tensor with a larger value, NaN or Inf is refused',
      { min: 0 },
      { group: JOB },
    ),
    ...evaluatorFlags,
    ...privacyFlags,
    ...serverFlags,
    ...adminTokenFlags,
    ...jsonFlag('print exactly { "jobId": "...", "tokens": { "a": "...", ... } }'),
  },
  after: 'Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed, 130 interrupted.',
  async action(v) {
    const parties = parseParties(v.parties);
    // First: its refusals of server-side search and weights say more than those flags' own checks.
    const secure = parsePrivacy(v, parties.length);
    const dpa = parseDpa(v.dpa, parties);
    const evaluator = parseEvaluator(v, parties, dpa.search !== undefined);
    if (dpa.search !== undefined) dpa.search = { ...dpa.search, ...evaluator };
    const request: CreateJobOptions = {
      basePath: v.base,
      parties,
      rate: v.rate,
      method: v.method ?? DEFAULT_PRUNE_METHOD,
      dpa: { ...dpa, scaleOutsideByMax: v['scale-outside-by-max'] },
      merge: {
        weights: parseWeights(v.weights, parties),
        signElection: v['sign-election'],
        partiesMayDownload: v['parties-may-download'],
      },
    };
    if (v.output !== undefined) request.merge!.output = MERGE_OUTPUTS[v.output];
    if (v.label !== undefined) request.label = v.label;
    if (secure !== undefined) request.secure = secure;
    if (v['max-abs-value'] === 0) throw new UsageError('--max-abs-value: must be > 0');
    if (v['max-abs-value'] !== undefined) request.maxAbsValue = v['max-abs-value'];
    const options = clientOptions(v, adminToken(v));
    return withClient(options, async (client, signal) => {
      const { job, tokens } = await client.createJob(request, { signal });
      if (v.json) {
        out(JSON.stringify({ jobId: job.id, tokens }));
      } else {
        const how = secure === undefined ? '' : `, secure aggregation with threshold ${secure.threshold}`;
        out(`job ${job.id} created (collecting uploads from ${parties.length} parties${how})`);
        out('tokens (shown only now; give each party its own):');
        const width = Math.max(...parties.map((p) => p.length));
        for (const p of parties) out(`  ${p.padEnd(width)}  ${tokens[p] ?? '(none returned)'}`);
      }
      return EXIT.ok;
    });
  },
});
