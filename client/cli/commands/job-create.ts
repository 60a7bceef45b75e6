import { parse, num, oneOf, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { evaluatorFlags, parseDpa, parseEvaluator, parseParties, parseWeights } from '../job-flags.js';
import { ADMIN_TOKEN_HELP, SERVER_HELP, adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';
import type { CreateJobOptions } from '../../sdk/jobs.js';
import { MergeOutput } from '../../../proto/gen/dppa/v1/jobs.js';

const MERGE_OUTPUTS = { dense: MergeOutput.MERGE_OUTPUT_DENSE, patch: MergeOutput.MERGE_OUTPUT_PATCH, both: MergeOutput.MERGE_OUTPUT_BOTH } as const;

const help = `Usage: dppa job create --server HOST:PORT --base DIR --parties a,b,c --rate R [options]

Creates a merge job on the server and prints its id and one token per party
(shown only now: hand each party its own token, e.g. with DPPA_TOKEN).

Required:
  --base DIR               folder of the base checkpoint on the server's disk
  --parties a,b,c          party names (letters, digits, '-', '_', at most 64 each)
  --rate R                 target pruning rate every party must use, in [0, 1)

Job:
  --method M               pruning method every party must use: dp (default), magnitude, owl, dare
  --dpa SPEC               amplification of the partitions (default off):
                             off                      every factor 1 (DP alone)
                             fixed:F1,F2,...          the same factors for every party, partition 1 first
                             fixed:a=F1,F2;b=F1,F2    factors per party (a leading F1,F2; sets the others)
                             search[:K=V,...]         factors searched per party; settings:
                                                      method=progressive|whole, tuner=greedy|golden,
                                                      start, step, upper, lower, budget, downward,
                                                      party-timeout (seconds a search waits for a
                                                      disconnected party, default 600)
  --scale-outside-by-max   scale outside tensors by the party's largest factor (default 1)
  --weights a=1,b=0.5      per-party merge weights (parties not named keep 1)
  --sign-election          TIES-style sign election per entry before summing
  --parties-may-download   let parties download the merged checkpoint with their own token
  --output dense|patch|both  what the merge writes (default both): the dense checkpoint, the merged
                           patch (dppa pull --base / --patch), or both; patch skips the dense write
  --label TEXT             a label for people
  --max-abs-value V        largest magnitude an uploaded delta value may have (default 1000,
                           see docs/server.md); a tensor with a larger value, NaN or Inf is refused

Evaluator of --dpa search (see docs/dpa.md):
  --evaluator remote|onnx  where candidates are scored: remote (default) on each party's machine
                           (dppa push --eval-cmd, dppa evaluate); onnx on the server
  --party-evaluator a=onnx,b=remote   per-party overrides
  --onnx-model FILE        ONNX model on the server whose initializers carry the checkpoint's names
  --onnx-tokenizer FILE    tokenizer description (JSON) for text tasks
  --onnx-name-map FILE     JSON { "checkpoint tensor": "initializer" } when the names differ
  --onnx-tasks P:T=FILE,...   validation tasks of party P (JSONL on the server); repeatable
  --onnx-finetuned P=DIR,...  party P's dense fine-tuned checkpoint on the server; repeatable
  --ort-provider cpu|cuda  ONNX Runtime execution provider (default cpu)
  --metric M               exact_match (default) or log_likelihood

${SERVER_HELP}
${ADMIN_TOKEN_HELP}

Output:
  --json                   print exactly { "jobId": "...", "tokens": { "a": "...", ... } }
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed, 130 interrupted.
`;

/** `dppa job create`: see the help text above. */
export const jobCreateCommand: Command = {
  name: 'job create',
  summary: 'create a merge job and print one token per party',
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      base: { type: 'string' },
      parties: { type: 'string' },
      rate: { type: 'string' },
      method: { type: 'string' },
      dpa: { type: 'string' },
      'scale-outside-by-max': { type: 'boolean' },
      weights: { type: 'string' },
      'sign-election': { type: 'boolean' },
      'parties-may-download': { type: 'boolean' },
      output: { type: 'string' },
      label: { type: 'string' },
      'max-abs-value': { type: 'string' },
      ...evaluatorFlags,
      json: { type: 'boolean' },
    });
    const parties = parseParties(v.parties);
    const dpa = parseDpa(v.dpa, parties);
    const evaluator = parseEvaluator(v, parties, dpa.search !== undefined);
    if (dpa.search !== undefined) dpa.search = { ...dpa.search, ...evaluator };
    const request: CreateJobOptions = {
      basePath: required(v.base, 'base'),
      parties,
      rate: num(required(v.rate, 'rate'), 'rate', { min: 0, below: 1 })!,
      method: oneOf(v.method, 'method', ['dp', 'magnitude', 'owl', 'dare'] as const) ?? 'dp',
      dpa: { ...dpa, scaleOutsideByMax: v['scale-outside-by-max'] === true },
      merge: { weights: parseWeights(v.weights, parties), signElection: v['sign-election'] === true, partiesMayDownload: v['parties-may-download'] === true },
    };
    const output = oneOf(v.output, 'output', ['dense', 'patch', 'both'] as const);
    if (output !== undefined) request.merge!.output = MERGE_OUTPUTS[output];
    if (v.label !== undefined) request.label = v.label;
    const maxAbsValue = num(v['max-abs-value'], 'max-abs-value', { min: 0 });
    if (maxAbsValue === 0) throw new UsageError('--max-abs-value: must be > 0');
    if (maxAbsValue !== undefined) request.maxAbsValue = maxAbsValue;
    const options = clientOptions(v, adminToken(v));
    return withClient(options, async (client, signal) => {
      const { job, tokens } = await client.createJob(request, { signal });
      if (v.json === true) {
        out(JSON.stringify({ jobId: job.id, tokens }));
      } else {
        out(`job ${job.id} created (collecting uploads from ${parties.length} parties)`);
        out('tokens (shown only now; give each party its own):');
        const width = Math.max(...parties.map((p) => p.length));
        for (const p of parties) out(`  ${p.padEnd(width)}  ${tokens[p] ?? '(none returned)'}`);
      }
      return EXIT.ok;
    });
  },
};
