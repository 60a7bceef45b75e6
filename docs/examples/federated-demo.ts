/**
 * `npm run demo`: the whole federated merge on the embedded model family on one machine, then DPPA beside its
 * baselines in one Domain-Ratio table; `-- --privacy secure`: the same job with secure aggregation, each party
 * searching its factors with its own evaluation. Steps: docs/design/examples.md.
 *
 *   npm run demo [-- [--out OUT_DIR] [--privacy plain|secure]]   (default dppa-demo/, which git ignores;
 *   `-- OUT_DIR` also works)
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { shellQuote } from '../../client/cli/eval-command.js';
import { formatBytes } from '../../client/cli/progress.js';
import {
  DppaClient,
  EvaluatorKind,
  JobState,
  jobStateName,
  pruneToFile,
  SecurePhase,
  type CreateJobOptions,
} from '../../client/index.js';
import { createLogger } from '../../server/log.js';
import { DppaServer } from '../../server/server.js';
import { domainRatio } from '../../proto/algorithm/index.js';
import {
  DOMAIN_NAMES,
  FAMILY,
  FamilyScorer,
  denseDelta,
  domainTaskFiles,
  fmt,
  markdownTable,
  memberDir,
  mergeWeights,
  readSparseDelta,
  readWeights,
  type Domain,
  type TaskScores,
  type Weights,
} from './family-lab.js';

const USAGE = `usage: npm run demo [-- [--out OUT_DIR] [--privacy plain|secure]]
       (or: npx tsx docs/examples/federated-demo.ts [--out OUT_DIR] [--privacy plain|secure])

Runs a federated DPPA job on the embedded model family (a server and three \`dppa push\` parties on this machine),
builds the baselines locally and prints one Domain-Ratio table.

  --out OUT_DIR     folder for the server's data, the deltas and results.json (default dppa-demo/); replaced when a
                    previous run of this demo made it, refused otherwise. A lone positional OUT_DIR means the same.
  --privacy secure  secure aggregation (docs/privacy.md): a job with threshold 2 of the three parties, whose server
                    sums masked vectors and never holds a party's delta; each party searches its own DPA factors
                    with its own evaluation (ONNX Runtime on its domain's validation split,
                    docs/examples/family-eval.ts as its --eval-cmd). The DPPA column is that secure merge.
                    Default: plain (the server searches the factors with its ONNX evaluator, then merges).
  -h, --help        this text`;
const cli = (() => {
  try {
    return parseArgs({
      options: { out: { type: 'string' }, privacy: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      allowPositionals: true,
    });
  } catch (e) {
    console.error(`${(e as Error).message}\n\n${USAGE}`);
    process.exit(2);
  }
})();
if (cli.values.help === true) {
  console.log(USAGE);
  process.exit(0);
}
if (cli.positionals.length > 1 || (cli.positionals.length === 1 && cli.values.out !== undefined)) {
  console.error(`give the output folder once\n\n${USAGE}`);
  process.exit(2);
}
if (cli.values.privacy !== undefined && !['plain', 'secure'].includes(cli.values.privacy)) {
  console.error(`--privacy: expected plain or secure, got ${cli.values.privacy}\n\n${USAGE}`);
  process.exit(2);
}
const secure = cli.values.privacy === 'secure';
const dir = cli.values.out ?? cli.positionals[0] ?? 'dppa-demo';
const root = fileURLToPath(new URL('../..', import.meta.url));
const RATE = 0.9;
/** Secure jobs: shares needed to unmask (2 of the 3 parties), and the clipping bound of the scaled values f·Δ. */
const THRESHOLD = 2;
// The family's deltas reach 0.044 in magnitude (family.json `deltas`, docs/results.md Table 4) and a factor may go up
// to the search's upper bound, 10: nothing is clipped.
const CLIP_BOUND = 4;
const started = Date.now();
const clock = (): string => `${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s`;
const step = (n: number, text: string): void => console.log(`[${n}/7 ${clock()}] ${text}`);
const pct = (x: number): string => `${(100 * x).toFixed(1)}%`;
/** The merges compared, in the table's order. */
const MERGES = ['dense', 'dare', 'magnitude', 'dp', 'dppa'] as const;
type MergeName = (typeof MERGES)[number];
const MERGE_LABEL: Record<MergeName, string> = {
  dense: 'dense sum',
  dare: 'DARE',
  magnitude: 'magnitude',
  dp: 'DP',
  dppa: secure ? 'DPPA (secure)' : 'DPPA',
};

// Only a folder this demo made (or none) is replaced: OUT_DIR may be any path the user typed.
const MARKER = '.dppa-demo';
if ((await readdir(dir).catch(() => [])).some((f) => f !== MARKER) && !existsSync(join(dir, MARKER))) {
  console.error(`${dir} exists and was not made by this demo; give another folder: npm run demo -- --out OUT_DIR`);
  process.exit(2);
}
await rm(dir, { recursive: true, force: true });
await mkdir(dir, { recursive: true });
await writeFile(join(dir, MARKER), 'made by npm run demo; the next run replaces this folder\n');
const base = memberDir('base');
const scorer = await FamilyScorer.open('test');
const baseWeights = await readWeights(base);
const finetuned = new Map<Domain, Weights>();
const reference = new Map<Domain, TaskScores>();
for (const d of DOMAIN_NAMES) {
  finetuned.set(d, await readWeights(memberDir(d)));
  reference.set(d, await scorer.score(finetuned.get(d)!, d));
}
step(1, `model family in ${FAMILY}: each fine-tune's test accuracy (the denominators of its Domain-Ratio)`);
for (const [d, s] of reference)
  console.log(
    `      ${d.padEnd(8)} ${Object.entries(s)
      .map(([t, a]) => `${t} ${pct(a)}`)
      .join(', ')}`,
  );

const adminToken = randomBytes(24).toString('base64url');
const server = new DppaServer({
  adminToken,
  dataDir: join(dir, 'server-data'),
  grpcPort: 0,
  metricsPort: 0,
  logger: createLogger({ level: 'warn' }),
});
await server.start();
const address = `127.0.0.1:${server.grpcPort}`;
step(2, `aggregation server on ${address} (data in ${dir}/server-data)`);

const admin = new DppaClient({ address, token: adminToken });
let dppa: Weights;
const chosen = new Map<string, number[]>();
const uploaded = new Map<Domain, number>();
/** Secure jobs: the values the parties clipped to the bound (MASKED_INPUT's count). */
let clipped = 0;
// Plain: the server searches each party's factors with its ONNX evaluator. Secure: each party searches its own
// (the server refuses a search for a secure job), then the server sums the masked vectors.
const plainSearch: CreateJobOptions['dpa'] = {
  search: {
    evaluator: EvaluatorKind.EVALUATOR_KIND_ONNX,
    onnx: {
      modelPath: join(FAMILY, 'model.onnx'),
      tokenizerPath: join(base, 'tokenizer.json'),
      partyTasks: Object.fromEntries(DOMAIN_NAMES.map((d) => [d, { tasks: domainTaskFiles(d, 'validation') }])),
      partyFinetuned: Object.fromEntries(DOMAIN_NAMES.map((d) => [d, memberDir(d)])),
      metric: 'exact_match',
    },
  },
};
try {
  const { job, tokens } = await admin.createJob({
    basePath: base,
    parties: DOMAIN_NAMES,
    rate: RATE,
    method: 'dp',
    ...(secure
      ? { secure: { threshold: THRESHOLD, clipBound: CLIP_BOUND }, label: 'demo (secure)' }
      : { dpa: plainSearch, label: 'demo' }),
  });
  if (secure) {
    step(
      3,
      `job ${job.id}: DP at rate ${RATE}, secure aggregation (threshold ${THRESHOLD} of ${DOMAIN_NAMES.length}, clip bound ${CLIP_BOUND})`,
    );
    step(
      4,
      'each party, in its own `dppa push` process, prunes (DP), searches its factors with its own evaluation (ONNX on its validation split), uploads its support, then masked values',
    );
  } else {
    step(3, `job ${job.id}: DP at rate ${RATE}, DPA search with the ONNX evaluator on the validation splits`);
    step(4, 'the three parties prune (DP) and push their deltas, each in its own `dppa push` process');
  }
  await Promise.all(DOMAIN_NAMES.map((party) => push(job.id, party, tokens[party]!)));

  step(
    5,
    secure
      ? 'the server closed the secure phases, unmasked the sum of the masked vectors and merges it'
      : "the server searches each party's factors (Domain-Ratio on validation), then merges",
  );
  for await (const e of admin.watchJob(job.id)) {
    const closed = e.securePhaseClosed;
    if (closed !== undefined) {
      const missing = closed.missing.length > 0 ? `, missing ${closed.missing.join(', ')}` : '';
      const union = closed.phase === SecurePhase.SECURE_PHASE_SUPPORT ? `, |U| = ${closed.unionSize} positions` : '';
      if (closed.phase === SecurePhase.SECURE_PHASE_MASKED_INPUT) clipped = Number(closed.clipped);
      const clip = closed.phase === SecurePhase.SECURE_PHASE_MASKED_INPUT ? `, ${clipped} value(s) clipped` : '';
      console.log(
        `      phase ${phaseWord(closed.phase).padEnd(12)} closed: ${closed.parties} parties${missing}${union}${clip} (${closed.seconds.toFixed(1)} s)`,
      );
    }
    const ev = e.evaluationDone?.evaluation;
    if (ev !== undefined) candidateLine(ev.party, ev.seq, ev.denseReference ? undefined : ev.factors, ev.domainRatio);
    if (e.factorsChosen !== undefined)
      choiceLine(e.factorsChosen.party, e.factorsChosen.factors, e.factorsChosen.domainRatio);
    if (e.stateChanged !== undefined)
      console.log(`      job ${jobStateName(e.stateChanged.from)} → ${jobStateName(e.stateChanged.to)}`);
    if (e.merged !== undefined) console.log(`      merged in ${e.merged.seconds.toFixed(2)} s`);
    if (e.failed !== undefined) throw new Error(`the job failed: ${e.failed.reason}`);
  }
  if (secure) uploadedSecure(await secureBytes(server.metricsPort));
  const final = await admin.getJob(job.id);
  if (final.state !== JobState.JOB_STATE_MERGED)
    throw new Error(`the job ended ${jobStateName(final.state)}: ${final.failureReason}`);
  const out = join(dir, 'merged');
  const pulled = await admin.pull({ jobId: job.id, out });
  dppa = await readWeights(out);
  console.log(`      pulled the merged checkpoint into ${out}/ (${pulled.files.length} files, SHA-256 checked)`);
} finally {
  admin.close();
  await server.stop();
}

step(
  6,
  `baselines built locally with the SDK (no server): DARE and magnitude at ${RATE}, DP without factors, the dense sum`,
);
const merged = new Map<MergeName, Weights>();
merged.set(
  'dense',
  mergeWeights(
    baseWeights,
    DOMAIN_NAMES.map((d) => ({ delta: denseDelta(baseWeights, finetuned.get(d)!) })),
  ),
);
for (const method of ['dare', 'magnitude'] as const) {
  const deltas = await Promise.all(
    DOMAIN_NAMES.map(async (d) => {
      const file = join(dir, `${d}-${method}.dppa`);
      await pruneToFile({ base, finetuned: memberDir(d), rate: RATE, method, out: file, workers: 1 });
      return { delta: await readSparseDelta(file, baseWeights) };
    }),
  );
  merged.set(method, mergeWeights(baseWeights, deltas));
}
// The very deltas the parties uploaded (kept by `dppa push --keep-delta`), with every factor 1.
merged.set(
  'dp',
  mergeWeights(
    baseWeights,
    await Promise.all(DOMAIN_NAMES.map(async (d) => ({ delta: await readSparseDelta(keptDelta(d), baseWeights) }))),
  ),
);
merged.set('dppa', dppa);

step(7, 'every merged model scored on the test splits');
const ratios = {} as Record<MergeName, Record<Domain, number>>;
for (const [name, weights] of merged) {
  const scores = await scorer.scoreAll(weights);
  ratios[name] = Object.fromEntries(DOMAIN_NAMES.map((d) => [d, domainRatio(scores[d], reference.get(d)!)])) as Record<
    Domain,
    number
  >;
  console.log(
    `      ${MERGE_LABEL[name].padEnd(secure ? 13 : 10)} ${DOMAIN_NAMES.map((d) => `${d} ${Object.values(scores[d]).map(pct).join('/')}`).join(', ')}`,
  );
}
await scorer.close();
console.log(
  `      DPPA factors chosen on validation: ${[...chosen].map(([p, f]) => `${p} [${f.join(', ')}]`).join(', ')}`,
);

// A dense delta holds one BF16 value per weight; the sparse one is what the server counted as received.
const denseBytes = [...baseWeights.values()].reduce((n, a) => n + 2 * a.length, 0);
const results = {
  ...(secure ? { privacy: 'secure' } : {}),
  rate: RATE,
  domainRatio: Object.fromEntries(
    MERGES.map((m) => [m, Object.fromEntries(DOMAIN_NAMES.map((d) => [d, round(ratios[m][d])]))]),
  ),
  uploadBytes: {
    dense: denseBytes * DOMAIN_NAMES.length,
    dppa: DOMAIN_NAMES.reduce((n, d) => n + uploaded.get(d)!, 0),
  },
};
await writeFile(join(dir, 'results.json'), JSON.stringify(results, null, 2) + '\n');
console.log(
  `\nThree-domain merges at pruning rate ${RATE}: Domain-Ratio (%) on the test splits (100 = the domain's own fine-tune),`,
);
console.log(
  `and the bytes each party uploaded (a dense BF16 delta would be ${formatBytes(denseBytes)}); also in ${join(dir, 'results.json')}:\n`,
);
if (secure)
  console.log(
    `DPPA (secure) is the secure merge: each party chose its factors itself, the server summed masked vectors\n` +
      `(${clipped} value(s) clipped) and never held a party's delta; its upload is the support (positions), the masked\n` +
      `words and the protocol's keys and shares. The other columns are built locally.\n`,
  );
console.log(
  markdownTable(
    ['domain', ...MERGES.map((m) => MERGE_LABEL[m]), secure ? 'DPPA upload (secure)' : 'DPPA upload'],
    DOMAIN_NAMES.map((d) => [
      d,
      ...MERGES.map((m) => fmt(100 * ratios[m][d])),
      `${formatBytes(uploaded.get(d)!)} (${pct(uploaded.get(d)! / denseBytes)})`,
    ]),
  ),
);
console.log(`Done in ${clock().trim()}.`);

function keptDelta(party: Domain): string {
  return join(dir, `${party}-dp.dppa`);
}

function round(x: number): number {
  return Math.round(x * 1e4) / 1e4;
}

/** Runs `dppa push` for one party in its own process; prints its last line. */
function push(jobId: string, party: Domain, token: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        join(root, 'client/cli/main.ts'),
        'push',
        '--server',
        address,
        '--job',
        jobId,
        '--party',
        party,
        '--base',
        base,
        '--finetuned',
        memberDir(party),
        '--rate',
        String(RATE),
        '--workers',
        '1',
        '--keep-delta',
        keptDelta(party),
        '--json',
        ...(secure
          ? [
              '--work-dir',
              join(dir, `${party}-work`),
              '--eval-cmd',
              `${shellQuote(process.execPath)} --import tsx ${shellQuote(join(root, 'docs/examples/family-eval.ts'))} ${party} {model}`,
            ]
          : []),
      ],
      { env: { ...process.env, DPPA_TOKEN: token }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stdout = '';
    let stderr = '';
    const progress = secure ? secureProgress(party) : undefined;
    // Strings, not buffers: a character split across two chunks stays whole.
    child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => {
      stderr += text;
      progress?.text(text);
    });
    child.once('error', reject);
    child.once('close', (code) => {
      if (code !== 0) return reject(new Error(`dppa push for ${party} exited with ${code}:\n${stderr}${stdout}`));
      if (progress !== undefined && !progress.end())
        return reject(new Error(`dppa push for ${party}: no factors step in its --json progress:\n${stderr}`));
      const state = JSON.parse(stdout.trim().split('\n').at(-1)!) as {
        bytesReceived: number;
        tensorsReceived: string[];
      };
      uploaded.set(party, state.bytesReceived);
      partyLine(
        party,
        secure
          ? `done: support of ${state.tensorsReceived.length} tensors (${formatBytes(state.bytesReceived)}), masked vector, unmask answered (${clock().trim()})`
          : `uploaded ${state.tensorsReceived.length} tensors, ${formatBytes(state.bytesReceived)} (${clock().trim()})`,
      );
      resolve();
    });
  });
}

/** One line of a secure `dppa push --json`'s progress on stderr (`{"step": …}`, client/cli/commands/push.ts). */
interface SecureStep {
  step: string;
  type?: string;
  candidate?: 'dense' | number[];
  domainRatio?: number;
  factors?: number[];
  words?: number;
  wordsTotal?: number;
  clipped?: number;
  survivors?: number[];
}

/**
 * Secure mode: follows a party's `dppa push --json` progress (JSON lines on stderr, however the chunks split them)
 * and prints its local search as the plain mode prints the server's, and its protocol rounds; records the factors
 * it chose. `end()` is false when no factors step was seen.
 */
function secureProgress(party: Domain): { text: (chunk: string) => void; end: () => boolean } {
  let pending = '';
  let seq = 0;
  const step = (p: SecureStep): void => {
    if (p.step === 'search' && p.type === 'scored')
      candidateLine(
        party,
        ++seq,
        p.candidate === 'dense' ? undefined : p.candidate,
        p.domainRatio!,
        ' (scored by the party)',
      );
    // The search's choice, then the same factors again (without their ratio) as the push applies them.
    else if (p.step === 'factors' && !chosen.has(party)) {
      chosen.set(party, p.factors!);
      choiceLine(party, p.factors!, p.domainRatio, ', applied before masking');
    } else if (p.step === 'union') partyLine(party, `union of the supports: ${p.words} positions`);
    else if (p.step === 'maskedComplete')
      partyLine(party, `masked vector held by the server (${p.wordsTotal} words, ${p.clipped ?? 0} value(s) clipped)`);
    else if (p.step === 'unmasked') partyLine(party, `unmask answered (survivors ${p.survivors!.join(', ')})`);
  };
  const line = (l: string): void => {
    // Lines not JSON (a warning) are kept in the error text only.
    if (l.startsWith('{')) step(JSON.parse(l) as SecureStep);
  };
  return {
    text: (chunk) => {
      const all = (pending + chunk).split('\n');
      pending = all.pop()!;
      all.forEach(line);
    },
    end: () => {
      line(pending);
      pending = '';
      return chosen.has(party);
    },
  };
}

/** A line of the demo about one party. */
function partyLine(party: string, text: string): void {
  console.log(`      ${party.padEnd(8)} ${text}`);
}

/** A candidate of a party's factor search scored (the server's evaluator's or the party's own): `undefined` the dense reference. */
function candidateLine(party: string, seq: number, factors: number[] | undefined, ratio: number, by = ''): void {
  const what = factors === undefined ? 'dense fine-tune (reference)' : `factors [${factors.join(', ')}]`;
  partyLine(party, `#${String(seq).padEnd(3)} ${what.padEnd(28)} Domain-Ratio ${fmt(100 * ratio)}${by}`);
}

/** The factors a party's search chose. */
function choiceLine(party: string, factors: number[], ratio: number | undefined, then = ''): void {
  partyLine(
    party,
    `chose [${factors.join(', ')}] (validation Domain-Ratio ${fmt(ratio === undefined ? undefined : 100 * ratio)})${then}`,
  );
}

/** A secure phase as a word (`masked_input`). */
function phaseWord(p: SecurePhase): string {
  return (SecurePhase[p] ?? String(p)).replace('SECURE_PHASE_', '').toLowerCase();
}

/** Bytes the server received for the secure rounds (keys, shares, masked words, unmask), from its metrics. */
async function secureBytes(metricsPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  let n = 0;
  for (const m of text.matchAll(/^dppa_secure_bytes_total\{phase="\w+"\} (\d+)$/gm)) n += Number(m[1]);
  return n;
}

/**
 * Adds each party's share of the secure rounds' bytes to its support upload: the parties send equal amounts (the same
 * |U| words, keys, one share per party, the same unmask answer).
 */
function uploadedSecure(total: number): void {
  for (const d of DOMAIN_NAMES) uploaded.set(d, uploaded.get(d)! + total / DOMAIN_NAMES.length);
}
