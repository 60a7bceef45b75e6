/**
 * A job's factor search settings (`DpaConfig.search`, a SearchConfig) as the
 * server uses them: checked at creation with the field at fault named, and the
 * evaluator and party timeout of each party. The search options themselves
 * come from proto/algorithm (`searchOptions`); as there, 0 takes the default
 * of `party_timeout_seconds`.
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { searchDefaults, searchOptions } from '../../proto/algorithm/index.js';
import {
  EvaluatorKind,
  SearchMethod,
  Tuner,
  type OnnxEvaluator,
  type SearchConfig,
} from '../../proto/gen/dppa/v1/jobs.js';
import { FormatError } from '../../proto/errors.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { InvalidArgumentError } from '../errors.js';
// Not ./onnx/index.js: that loads ONNX Runtime, which only jobs with an ONNX evaluator need.
import { METRICS, type Metric } from './onnx/causal-lm-scorer.js';

/** How long a search waits for a party that is not connected, unless the job says otherwise. */
export const DEFAULT_PARTY_TIMEOUT_SECONDS = 600;

/** Where a party's candidates are scored. */
export type EvaluatorName = 'remote' | 'onnx';

const KINDS = [
  EvaluatorKind.EVALUATOR_KIND_UNSPECIFIED,
  EvaluatorKind.EVALUATOR_KIND_REMOTE,
  EvaluatorKind.EVALUATOR_KIND_ONNX,
];
const PROVIDERS = ['cpu', 'cuda'];

/** The evaluator of a party: its override, else the job's, else remote. */
export function evaluatorOf(s: SearchConfig, party: string): EvaluatorName {
  const kind = s.partyEvaluator[party] ?? s.evaluator;
  return kind === EvaluatorKind.EVALUATOR_KIND_ONNX ? 'onnx' : 'remote';
}

/** Seconds a search waits for a party that is not connected. */
export function partyTimeoutSeconds(s: SearchConfig): number {
  return s.partyTimeoutSeconds === 0 ? DEFAULT_PARTY_TIMEOUT_SECONDS : s.partyTimeoutSeconds;
}

/** The ONNX evaluator's metric (`exact_match` unless set). */
export function onnxMetric(onnx: OnnxEvaluator): Metric {
  return onnx.metric === '' ? 'exact_match' : (onnx.metric as Metric);
}

/**
 * Checks a SearchConfig for a job of these parties (everything but files,
 * see {@link resolveOnnxFiles}).
 * @throws InvalidArgumentError naming the field at fault (`dpa.search.step: …`).
 */
export function checkSearch(s: SearchConfig, parties: readonly string[]): void {
  const field = (name: string, message: string): InvalidArgumentError =>
    new InvalidArgumentError(`dpa.search.${name}: ${message}`);
  if (
    ![
      SearchMethod.SEARCH_METHOD_UNSPECIFIED,
      SearchMethod.SEARCH_METHOD_PROGRESSIVE,
      SearchMethod.SEARCH_METHOD_WHOLE,
    ].includes(s.method)
  ) {
    throw field('method', `unknown value ${s.method}`);
  }
  if (![Tuner.TUNER_UNSPECIFIED, Tuner.TUNER_GREEDY, Tuner.TUNER_GOLDEN].includes(s.tuner))
    throw field('tuner', `unknown value ${s.tuner}`);
  for (const [name, v] of [
    ['start', s.start],
    ['step', s.step],
    ['upper', s.upper],
    ['lower', s.lower],
  ] as const) {
    if (!Number.isFinite(v)) throw field(name, `must be a finite number, got ${v}`);
  }
  if (s.lower < 0) throw field('lower', `must be ≥ 0, got ${s.lower}`);
  try {
    searchDefaults(searchOptions(s, 1));
  } catch (err) {
    // searchDefaults names the setting first ("step: must be positive …"), as the proto field is named.
    if (err instanceof RangeError) throw new InvalidArgumentError(`dpa.search.${err.message}`, { cause: err });
    throw err;
  }
  if (!KINDS.includes(s.evaluator)) throw field('evaluator', `unknown value ${s.evaluator}`);
  for (const [party, kind] of Object.entries(s.partyEvaluator)) {
    if (!parties.includes(party)) throw field('party_evaluator', `${JSON.stringify(party)} is not a party of the job`);
    if (!KINDS.includes(kind)) throw field(`party_evaluator[${party}]`, `unknown value ${kind}`);
  }
  const onnxParties = parties.filter((p) => evaluatorOf(s, p) === 'onnx');
  if (onnxParties.length > 0) checkOnnx(s.onnx, parties, onnxParties);
}

function checkOnnx(onnx: OnnxEvaluator | undefined, parties: readonly string[], onnxParties: readonly string[]): void {
  const field = (name: string, message: string): InvalidArgumentError =>
    new InvalidArgumentError(`dpa.search.onnx.${name}: ${message}`);
  const who = `the evaluator of ${onnxParties.join(', ')} is ONNX`;
  if (onnx === undefined) throw new InvalidArgumentError(`dpa.search.onnx: required, since ${who}`);
  if (onnx.modelPath.trim() === '') throw field('model_path', `required, since ${who}`);
  if (onnx.metric !== '' && !(METRICS as readonly string[]).includes(onnx.metric)) {
    throw field('metric', `expected ${METRICS.join(' or ')}, got ${JSON.stringify(onnx.metric)}`);
  }
  if (onnx.provider !== '' && !PROVIDERS.includes(onnx.provider))
    throw field('provider', `expected cpu or cuda, got ${JSON.stringify(onnx.provider)}`);
  for (const [name, map] of [
    ['party_tasks', onnx.partyTasks],
    ['party_finetuned', onnx.partyFinetuned],
  ] as const) {
    for (const party of Object.keys(map)) {
      if (!parties.includes(party)) throw field(name, `${JSON.stringify(party)} is not a party of the job`);
    }
  }
  for (const party of onnxParties) {
    const tasks = Object.entries(onnx.partyTasks[party]?.tasks ?? {});
    if (tasks.length === 0)
      throw field(
        `party_tasks[${party}]`,
        `at least one task file is required, since party ${party}'s evaluator is ONNX`,
      );
    for (const [task, path] of tasks) {
      if (task.trim() === '') throw field(`party_tasks[${party}]`, 'task names must not be empty');
      if (path.trim() === '') throw field(`party_tasks[${party}].tasks[${task}]`, 'path required');
    }
    if ((onnx.partyFinetuned[party] ?? '').trim() === '') {
      throw field(
        `party_finetuned[${party}]`,
        `required: the dense fine-tuned checkpoint gives party ${party}'s reference scores`,
      );
    }
  }
}

/**
 * Checks that the ONNX evaluator's files exist on the server and returns the
 * settings with absolute paths, so that a server started from another folder
 * finds them. Settings of parties whose evaluator is remote are kept as given.
 * @throws InvalidArgumentError naming the field and the path.
 */
export async function resolveOnnxFiles(s: SearchConfig, parties: readonly string[]): Promise<SearchConfig> {
  const onnx = s.onnx;
  const onnxParties = parties.filter((p) => evaluatorOf(s, p) === 'onnx');
  if (onnx === undefined || onnxParties.length === 0) return s;
  const file = async (name: string, path: string): Promise<string> => {
    const abs = resolve(path);
    const info = await stat(abs).catch((err: NodeJS.ErrnoException) => {
      throw new InvalidArgumentError(
        `dpa.search.onnx.${name}: ${abs} ${err.code === 'ENOENT' ? 'does not exist on the server' : `cannot be read: ${err.message}`}`,
        { cause: err },
      );
    });
    if (!info.isFile()) throw new InvalidArgumentError(`dpa.search.onnx.${name}: ${abs} is not a file`);
    return abs;
  };
  const resolved: OnnxEvaluator = {
    ...onnx,
    partyTasks: { ...onnx.partyTasks },
    partyFinetuned: { ...onnx.partyFinetuned },
  };
  resolved.modelPath = await file('model_path', onnx.modelPath);
  if (onnx.tokenizerPath !== '') resolved.tokenizerPath = await file('tokenizer_path', onnx.tokenizerPath);
  if (onnx.nameMapPath !== '') resolved.nameMapPath = await file('name_map_path', onnx.nameMapPath);
  for (const party of onnxParties) {
    const tasks: Record<string, string> = {};
    for (const [task, path] of Object.entries(onnx.partyTasks[party]!.tasks))
      tasks[task] = await file(`party_tasks[${party}].tasks[${task}]`, path);
    resolved.partyTasks[party] = { tasks };
    resolved.partyFinetuned[party] = await checkpointPath(`party_finetuned[${party}]`, onnx.partyFinetuned[party]!);
  }
  return { ...s, onnx: resolved };
}

async function checkpointPath(name: string, path: string): Promise<string> {
  const abs = resolve(path);
  try {
    await (await Checkpoint.open(abs)).close();
    return abs;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT')
      throw new InvalidArgumentError(`dpa.search.onnx.${name}: ${abs} does not exist on the server`, { cause: err });
    if (err instanceof FormatError || code === 'EACCES' || code === 'EISDIR' || code === 'ENOTDIR') {
      throw new InvalidArgumentError(
        `dpa.search.onnx.${name}: ${abs} is not a readable checkpoint: ${(err as Error).message}`,
        { cause: err },
      );
    }
    throw err;
  }
}
