/**
 * Parsing of `dppa job create`'s richer flags into the proto messages:
 * `--parties`, `--dpa` (DpaConfig), the evaluator flags of a search
 * (SearchConfig.evaluator, party_evaluator, onnx) and `--weights`
 * (MergeOptions.weights), and the privacy flags of a secure job.
 */
import {
  EvaluatorKind,
  SearchMethod,
  Tuner,
  type DeepPartial,
  type DpaConfig,
  type OnnxEvaluator,
  type SearchConfig,
} from '../../proto/gen/dppa/v1/jobs.js';
import { choice, number, repeatable, text, type FlagValues } from '../../proto/cli/flag-table.js';
import type { SecureJobOptions } from '../sdk/jobs.js';
import { UsageError } from './exit-codes.js';

const PARTY_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/** `--parties a,b,c`: names of letters, digits, '-', '_' (at most 64), no repeats. */
export function parseParties(value: string | undefined): string[] {
  if (value === undefined || value.trim() === '')
    throw new UsageError('--parties is required (e.g. --parties math,law,code)');
  const parties = value.split(',').map((p) => p.trim());
  const seen = new Set<string>();
  for (const p of parties) {
    if (!PARTY_NAME.test(p))
      throw new UsageError(
        `--parties: ${JSON.stringify(p)} is not a party name (letters, digits, '-', '_', at most 64)`,
      );
    if (seen.has(p)) throw new UsageError(`--parties: ${p} is given twice`);
    seen.add(p);
  }
  return parties;
}

function factor(text: string, flag: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n < 0)
    throw new UsageError(`--${flag}: expected a number ≥ 0, got ${JSON.stringify(text)}`);
  return n;
}

function factorList(text: string, what: string): number[] {
  if (text.trim() === '') throw new UsageError(`--dpa: no factors ${what}`);
  return text.split(',').map((f) => factor(f, 'dpa'));
}

function party(name: string, parties: readonly string[], flag: string): string {
  if (!parties.includes(name))
    throw new UsageError(`--${flag}: ${JSON.stringify(name)} is not one of --parties (${parties.join(', ')})`);
  return name;
}

const SEARCH_KEYS = [
  'method',
  'tuner',
  'start',
  'step',
  'upper',
  'lower',
  'budget',
  'downward',
  'party-timeout',
] as const;

function searchConfig(spec: string): DeepPartial<SearchConfig> {
  const s: DeepPartial<SearchConfig> = {};
  if (spec === '') return s;
  for (const pair of spec.split(',')) {
    const eq = pair.indexOf('=');
    const key = eq < 0 ? pair : pair.slice(0, eq);
    const value = eq < 0 ? '' : pair.slice(eq + 1);
    const number = (o: { integer?: boolean } = {}): number => {
      const n = Number(value);
      if (value === '' || !Number.isFinite(n) || n < 0 || (o.integer === true && !Number.isInteger(n))) {
        throw new UsageError(
          `--dpa: search ${key}: expected ${o.integer === true ? 'an integer' : 'a number'} ≥ 0, got ${JSON.stringify(value)}`,
        );
      }
      return n;
    };
    switch (key as (typeof SEARCH_KEYS)[number]) {
      case 'method':
        if (value !== 'progressive' && value !== 'whole')
          throw new UsageError(`--dpa: search method: expected progressive or whole, got ${JSON.stringify(value)}`);
        s.method = value === 'whole' ? SearchMethod.SEARCH_METHOD_WHOLE : SearchMethod.SEARCH_METHOD_PROGRESSIVE;
        break;
      case 'tuner':
        if (value !== 'greedy' && value !== 'golden')
          throw new UsageError(`--dpa: search tuner: expected greedy or golden, got ${JSON.stringify(value)}`);
        s.tuner = value === 'golden' ? Tuner.TUNER_GOLDEN : Tuner.TUNER_GREEDY;
        break;
      case 'start':
        s.start = number();
        break;
      case 'step':
        s.step = number();
        break;
      case 'upper':
        s.upper = number();
        break;
      case 'lower':
        s.lower = number();
        break;
      case 'budget':
        s.budget = number({ integer: true });
        break;
      case 'downward':
        if (value !== '' && value !== 'true' && value !== 'false')
          throw new UsageError(`--dpa: search downward: expected true or false, got ${JSON.stringify(value)}`);
        s.downward = value !== 'false';
        break;
      case 'party-timeout':
        s.partyTimeoutSeconds = number({ integer: true });
        break;
      default:
        throw new UsageError(`--dpa: unknown search setting ${JSON.stringify(key)} (known: ${SEARCH_KEYS.join(', ')})`);
    }
  }
  return s;
}

/**
 * `--dpa`:
 * - `off` (the default): every factor 1, DP alone;
 * - `fixed:F1,F2,…`: the same factors for every party, partition 1 first;
 * - `fixed:a=F1,F2;b=F1,F2` (optionally with a leading `F1,F2;` for the others): per party;
 * - `search` or `search:method=whole,tuner=golden,start=1.8,step=0.1,upper=10,lower=0,budget=12,downward,party-timeout=600`.
 */
export function parseDpa(value: string | undefined, parties: readonly string[]): DeepPartial<DpaConfig> {
  if (value === undefined || value === 'off') return { off: true };
  const colon = value.indexOf(':');
  const mode = colon < 0 ? value : value.slice(0, colon);
  const spec = colon < 0 ? '' : value.slice(colon + 1);
  if (mode === 'search') return { search: searchConfig(spec) };
  if (mode !== 'fixed')
    throw new UsageError(
      `--dpa: expected off, fixed:F1,F2,…, fixed:a=F1,F2;b=…, or search[:…], got ${JSON.stringify(value)}`,
    );
  let factors: number[] = [];
  const perParty: Record<string, { factors: number[] }> = {};
  for (const part of spec.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) {
      if (factors.length > 0) throw new UsageError('--dpa: the default factors (without a party name) are given twice');
      factors = factorList(part, 'for every party');
    } else {
      const name = party(part.slice(0, eq).trim(), parties, 'dpa');
      if (name in perParty) throw new UsageError(`--dpa: factors for ${name} are given twice`);
      perParty[name] = { factors: factorList(part.slice(eq + 1), `for ${name}`) };
    }
  }
  if (factors.length === 0) {
    const missing = parties.filter((p) => !(p in perParty));
    if (missing.length > 0)
      throw new UsageError(
        `--dpa: no factors for ${missing.join(', ')} (give them, or default factors before the first ';')`,
      );
  }
  return { fixed: { factors, perParty } };
}

const EVALUATOR = 'Evaluator of --dpa search (see docs/dpa.md)';

/** The evaluator flags of a search. */
export const evaluatorFlags = {
  evaluator: text(
    'remote|onnx',
    "where candidates are scored: remote (default) on each party's machine (dppa push --eval-cmd, dppa evaluate); onnx on the server",
    { group: EVALUATOR },
  ),
  'party-evaluator': text('a=onnx,b=remote', 'per-party overrides', { group: EVALUATOR }),
  'onnx-model': text('FILE', "ONNX model on the server whose initializers carry the checkpoint's names", {
    group: EVALUATOR,
  }),
  'onnx-tokenizer': text('FILE', 'tokenizer description (JSON) for text tasks', { group: EVALUATOR }),
  'onnx-name-map': text('FILE', 'JSON { "checkpoint tensor": "initializer" } when the names differ', {
    group: EVALUATOR,
  }),
  'onnx-tasks': repeatable('P:T=FILE,...', 'validation tasks of party P (JSONL on the server); repeatable', {
    group: EVALUATOR,
  }),
  'onnx-finetuned': repeatable('P=DIR,...', "party P's dense fine-tuned checkpoint on the server; repeatable", {
    group: EVALUATOR,
  }),
  'ort-provider': text('cpu|cuda', 'ONNX Runtime execution provider (default cpu)', { group: EVALUATOR }),
  metric: text('M', 'exact_match (default) or log_likelihood', { group: EVALUATOR }),
};

/** Values of {@link evaluatorFlags}. */
export type EvaluatorFlagValues = Partial<FlagValues<typeof evaluatorFlags>>;

function evaluatorKind(word: string, flag: string): EvaluatorKind {
  if (word === 'remote') return EvaluatorKind.EVALUATOR_KIND_REMOTE;
  if (word === 'onnx') return EvaluatorKind.EVALUATOR_KIND_ONNX;
  throw new UsageError(`--${flag}: expected remote or onnx, got ${JSON.stringify(word)}`);
}

/** Splits `a=x,b=y` (or several such flags) into pairs, the key checked as a party. */
function partyPairs(
  values: readonly string[],
  parties: readonly string[],
  flag: string,
  what: string,
): [string, string][] {
  const pairs: [string, string][] = [];
  for (const item of values.flatMap((v) => v.split(','))) {
    const eq = item.indexOf('=');
    if (eq < 0) throw new UsageError(`--${flag}: expected ${what}, got ${JSON.stringify(item)}`);
    pairs.push([party(item.slice(0, eq).trim(), parties, flag), item.slice(eq + 1)]);
  }
  return pairs;
}

/**
 * The evaluator flags of `--dpa search`, into SearchConfig fields:
 * - `--evaluator remote|onnx` (default remote: each party scores on its own machine);
 * - `--party-evaluator a=onnx,b=remote`: per-party overrides;
 * - ONNX settings: `--onnx-model FILE`, `--onnx-tokenizer FILE`, `--onnx-name-map FILE`,
 *   `--onnx-tasks party:task=FILE,…` and `--onnx-finetuned party=DIR,…` (each may be repeated),
 *   `--ort-provider cpu|cuda`, `--metric exact_match|log_likelihood`.
 * @returns The fields to merge into the search settings (empty when no flag was given).
 * @throws UsageError when a flag is malformed, names an unknown party, or is given without `--dpa search`.
 */
export function parseEvaluator(
  v: EvaluatorFlagValues,
  parties: readonly string[],
  searching: boolean,
): DeepPartial<SearchConfig> {
  const given = (Object.keys(evaluatorFlags) as (keyof EvaluatorFlagValues)[]).filter((k) => v[k] !== undefined);
  if (given.length === 0) return {};
  if (!searching) throw new UsageError(`${given.map((k) => `--${k}`).join(', ')}: only with --dpa search`);
  const s: DeepPartial<SearchConfig> = {};
  if (v.evaluator !== undefined) s.evaluator = evaluatorKind(v.evaluator, 'evaluator');
  if (v['party-evaluator'] !== undefined) {
    s.partyEvaluator = Object.fromEntries(
      partyPairs([v['party-evaluator']], parties, 'party-evaluator', 'party=remote|onnx').map(([p, k]) => [
        p,
        evaluatorKind(k, 'party-evaluator'),
      ]),
    );
  }
  const onnx: DeepPartial<OnnxEvaluator> = {};
  if (v['onnx-model'] !== undefined) onnx.modelPath = v['onnx-model'];
  if (v['onnx-tokenizer'] !== undefined) onnx.tokenizerPath = v['onnx-tokenizer'];
  if (v['onnx-name-map'] !== undefined) onnx.nameMapPath = v['onnx-name-map'];
  if (v['ort-provider'] !== undefined) {
    if (v['ort-provider'] !== 'cpu' && v['ort-provider'] !== 'cuda')
      throw new UsageError(`--ort-provider: expected cpu or cuda, got ${JSON.stringify(v['ort-provider'])}`);
    onnx.provider = v['ort-provider'];
  }
  if (v.metric !== undefined) {
    if (v.metric !== 'exact_match' && v.metric !== 'log_likelihood')
      throw new UsageError(`--metric: expected exact_match or log_likelihood, got ${JSON.stringify(v.metric)}`);
    onnx.metric = v.metric;
  }
  if (v['onnx-tasks'] !== undefined) {
    const tasks: Record<string, { tasks: Record<string, string> }> = {};
    for (const item of v['onnx-tasks'].flatMap((t) => t.split(','))) {
      const m = /^([^:=]+):([^=]+)=(.+)$/.exec(item);
      if (m === null) throw new UsageError(`--onnx-tasks: expected party:task=FILE, got ${JSON.stringify(item)}`);
      const p = party(m[1]!.trim(), parties, 'onnx-tasks');
      const task = m[2]!.trim();
      const entry = (tasks[p] ??= { tasks: {} });
      if (task in entry.tasks) throw new UsageError(`--onnx-tasks: task ${task} of ${p} is given twice`);
      entry.tasks[task] = m[3]!;
    }
    onnx.partyTasks = tasks;
  }
  if (v['onnx-finetuned'] !== undefined) {
    const finetuned: Record<string, string> = {};
    for (const [p, path] of partyPairs(v['onnx-finetuned'], parties, 'onnx-finetuned', 'party=DIR')) {
      if (p in finetuned) throw new UsageError(`--onnx-finetuned: ${p} is given twice`);
      finetuned[p] = path;
    }
    onnx.partyFinetuned = finetuned;
  }
  if (Object.keys(onnx).length > 0) s.onnx = onnx;
  return s;
}

/** `--weights a=1,b=0.5`: per-party weights c_i (parties not named keep 1). */
export function parseWeights(value: string | undefined, parties: readonly string[]): Record<string, number> {
  const weights: Record<string, number> = {};
  if (value === undefined) return weights;
  for (const pair of value.split(',')) {
    const eq = pair.indexOf('=');
    if (eq < 0) throw new UsageError(`--weights: expected party=weight, got ${JSON.stringify(pair)}`);
    const name = party(pair.slice(0, eq).trim(), parties, 'weights');
    if (name in weights) throw new UsageError(`--weights: ${name} is given twice`);
    weights[name] = factor(pair.slice(eq + 1), 'weights');
  }
  return weights;
}

const PRIVACY = 'Privacy (docs/privacy.md)';

/** The flags of a secure job. */
export const privacyFlags = {
  privacy: choice(
    'plain|secure',
    ['plain', 'secure'] as const,
    "plain (default): the server sees each party's pruned delta; secure: secure aggregation, the server learns only the sum (each party searches and applies its own factors when it pushes)",
    { group: PRIVACY },
  ),
  threshold: number(
    'T',
    'with --privacy secure (required): parties that must stay to the end, 2 ≤ T ≤ the parties',
    { min: 2, integer: true },
    { group: PRIVACY },
  ),
  'clip-bound': number(
    'B',
    'with --privacy secure: clipping bound of the scaled values c·f·Δ each party sums (default 1; beyond it values are clipped and counted)',
    { min: 0 },
    { group: PRIVACY },
  ),
  'phase-seconds': number(
    'S',
    'with --privacy secure: seconds each phase waits for parties that have not answered (default 600; a party searches its factors before it joins, so allow for that)',
    { min: 1, integer: true },
    { group: PRIVACY },
  ),
};

/** Values of {@link privacyFlags} and the job flags a secure job refuses. */
export type PrivacyFlagValues = Partial<FlagValues<typeof privacyFlags>> &
  EvaluatorFlagValues & { dpa?: string | undefined; weights?: string | undefined; 'sign-election'?: boolean };

/**
 * `--privacy secure --threshold T [--clip-bound B] [--phase-seconds S]` into the SDK's secure options.
 * @returns undefined for a plain job.
 * @throws UsageError naming the flag: a secure flag without --privacy secure, a secure job without --threshold,
 *   or a flag a secure job refuses (a search or evaluator on the server, factors, weights, sign election).
 */
export function parsePrivacy(v: PrivacyFlagValues, parties: number): SecureJobOptions | undefined {
  const secureOnly = (['threshold', 'clip-bound', 'phase-seconds'] as const).filter((k) => v[k] !== undefined);
  if (v.privacy !== 'secure') {
    if (secureOnly.length > 0)
      throw new UsageError(`${secureOnly.map((k) => `--${k}`).join(', ')}: only with --privacy secure`);
    return undefined;
  }
  if (v.threshold === undefined)
    throw new UsageError(
      '--privacy secure needs --threshold T: the parties that must stay to the end (2 ≤ T ≤ the parties)',
    );
  if (v.threshold > parties)
    throw new UsageError(`--threshold: at most the number of parties, ${parties}; got ${v.threshold}`);
  if (v['clip-bound'] === 0) throw new UsageError('--clip-bound: must be > 0');
  const local = 'each party searches (with its own --eval-cmd) and applies its own factors when it runs dppa push';
  if (v.dpa !== undefined && v.dpa !== 'off') {
    const mode = v.dpa.split(':')[0];
    if (mode !== 'fixed' || !fixedAllOnes(v.dpa))
      throw new UsageError(
        `--dpa ${mode}: a secure job runs no factor search and applies no factors on the server; ${local}: drop --dpa`,
      );
  }
  const evaluator = (Object.keys(evaluatorFlags) as (keyof EvaluatorFlagValues)[]).filter((k) => v[k] !== undefined);
  if (evaluator.length > 0)
    throw new UsageError(
      `${evaluator.map((k) => `--${k}`).join(', ')}: a secure job has no evaluator on the server (no ONNX, no remote search); ${local}`,
    );
  if (v.weights !== undefined)
    throw new UsageError(
      '--weights: the server of a secure job sees only the sum, so it cannot weight the parties; each party scales its own delta',
    );
  if (v['sign-election'] === true)
    throw new UsageError("--sign-election: the server of a secure job sees only the sum, not each party's signs");
  return {
    threshold: v.threshold,
    ...(v['clip-bound'] === undefined ? {} : { clipBound: v['clip-bound'] }),
    ...(v['phase-seconds'] === undefined ? {} : { phaseSeconds: v['phase-seconds'] }),
  };
}

/** True when a `fixed:` spec gives factor 1 everywhere (harmless for a secure job). */
function fixedAllOnes(spec: string): boolean {
  const numbers = spec
    .slice('fixed:'.length)
    .split(/[;,]/)
    .map((part) => part.slice(part.indexOf('=') + 1).trim());
  return numbers.length > 0 && numbers.every((n) => n !== '' && Number(n) === 1);
}
