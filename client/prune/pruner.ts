/**
 * Prunes one party's delta with DP or a baseline method, tensor by tensor, into partitioned sparse records
 * (spec "DP", "Partitions", "Baselines"). See docs/design/pruning.md.
 */
import { availableParallelism } from 'node:os';
import {
  checkLevels,
  DEFAULT_OUTSIDE_POLICY,
  DEFAULT_PRUNE_METHOD,
  defaultLevels,
  outsidePolicyToWire,
  parseOutsidePolicy,
  parsePruneMethod,
  pruneMethodToWire,
  type OutsidePolicy,
  type PruneMethod,
} from '../../proto/algorithm/index.js';
import {
  TensorKind,
  ValueDtype,
  ValueKind,
  type DeltaHeader,
  type DeltaRecord,
  type TensorPlan,
} from '../../proto/gen/dppa/v1/sparse.js';
import { baseFingerprint } from '../../proto/fingerprint.js';
import type { Dtype } from '../../proto/safetensors/index.js';
import { formatVersionOf } from '../../proto/sparse/index.js';
import { DeltaSource, type DeltaTensor, type VocabMismatch } from './delta-source.js';
import type { DareRescale } from './dare.js';
import { dpOffsets, keptCount, owlOffsets, rateAt } from './rates.js';
import { addTotals, outliersAbove, outlierThreshold, significance, type SignificanceKind } from './significance.js';
import { compileLayerPattern, DEFAULT_LAYER_PATTERN, tensorRole, type TensorRole } from './tensor-roles.js';
import type { PruneSpec, PrunedTensor, TensorStats } from './tensor-work.js';
import { inlineRunner, workerRunner, type TensorRunner } from './worker-pool.js';

export type { OutsidePolicy, PruneMethod } from '../../proto/algorithm/index.js';
/** Precision of the kept values on the wire. */
export type ValuePrecision = 'bf16' | 'f16' | 'f32';

/** Options of {@link openPrune}. */
export interface PruneOptions {
  /** Folder (or file) of the base checkpoint. */
  base: string;
  /** Folder (or file) of the fine-tuned checkpoint. */
  finetuned: string;
  /** Target pruning rate α in [0, 1). */
  rate: number;
  /** @default 'dp' */
  method?: PruneMethod;
  /** Partition levels, decreasing, ending at `rate`. @default 0.9, 0.8, … down to `rate` */
  levels?: number[];
  /** @default 'magnitude' (the paper); 'count' as the released code and OWL */
  significance?: SignificanceKind;
  /** Outlier factor N at model-layer level (DP) and OWL's M. @default 5 (the released code used 3) */
  layerOutlierFactor?: number;
  /** Outlier factor N at linear-layer level. @default 5 */
  linearOutlierFactor?: number;
  /** Largest rate fluctuation λ. @default 0.08 */
  lambda?: number;
  /** Regular expression whose first group is the model-layer number. @default layers.N. / h.N. / blocks.N. */
  layerPattern?: string;
  /** @default 'dense' */
  outside?: OutsidePolicy;
  /** DARE seed. @default 0 */
  seed?: number;
  /** DARE rescaling. @default 'inverse' (1/(1−p)) */
  dareRescale?: DareRescale;
  /**
   * Precision of the kept values. The values are the fine-tuned weights themselves (exact) when the method does not
   * rescale them (not DARE) and this precision holds every fine-tuned tensor's dtype exactly; deltas otherwise.
   * @default the fine-tuned checkpoint's dtype when every tensor is bf16 (or every one f16) and the method is not
   *   DARE; otherwise 'bf16'
   */
  valueDtype?: ValuePrecision;
  /**
   * Form of the kept values: 'auto' sends the fine-tuned weights when `valueDtype` allows it (see there), 'delta'
   * always sends deltas Δ = F − B (format version 1, which older servers read; secure pushes and jobs with a
   * max_abs_value need it).
   * @default 'auto'
   */
  valueKind?: ValueKindChoice;
  /** @default 'error' */
  vocabMismatch?: VocabMismatch;
  /** Worker threads; 1 runs inline. Results are identical for any count. @default min(2, cores) */
  workers?: number;
  /** Cancels the work between tensors. */
  signal?: AbortSignal;
  /** Called after each tensor of each pass. */
  onProgress?: (p: PruneProgress) => void;
}

/** Choices of {@link PruneOptions.valueKind}. */
export type ValueKindChoice = 'delta' | 'auto';

/** Progress of a prune. */
export interface PruneProgress {
  phase: 'significance' | 'prune';
  tensor: string;
  tensorsDone: number;
  tensorsTotal: number;
  /** Bytes of base plus fine-tuned tensor data processed in this phase. */
  bytesDone: number;
  bytesTotal: number;
}

/** One line of the prune report. */
export interface TensorReport {
  name: string;
  shape: number[];
  numel: number;
  /** Pruning rate applied at the target level. */
  rate: number;
  /** Entries kept in all. */
  kept: number;
  /** Kept entries per partition; index 0 is partition 0 (outside tensors). */
  keptPerPartition: number[];
}

/** What a prune did, tensor by tensor. */
export interface PruneReport {
  method: PruneMethod;
  rate: number;
  levels: number[];
  tensors: TensorReport[];
  /** Linear layers whose rate reached 1 at the target: dropped whole. */
  droppedWhole: string[];
  /** Tensors compared on the base's rows only (`vocabMismatch: 'truncate'`). */
  truncated: string[];
}

const PRECISIONS: Record<ValuePrecision, ValueDtype> = {
  bf16: ValueDtype.VALUE_DTYPE_BF16,
  f16: ValueDtype.VALUE_DTYPE_F16,
  f32: ValueDtype.VALUE_DTYPE_F32,
};

type Resolved = Required<Omit<PruneOptions, 'signal' | 'onProgress' | 'valueDtype'>> & {
  /** Undefined: chosen from the fine-tuned checkpoint by {@link valueForm}. */
  valueDtype: ValuePrecision | undefined;
  signal: AbortSignal | undefined;
  onProgress: PruneOptions['onProgress'] | undefined;
};

/**
 * Fills in defaults and checks every option.
 * @throws RangeError naming the option that is wrong.
 */
export function withDefaults(opts: PruneOptions): Resolved {
  const rate = opts.rate;
  if (!(rate >= 0 && rate < 1)) throw new RangeError(`rate: must be in [0, 1), got ${rate}`);
  const levels = opts.levels ?? defaultLevels(rate);
  checkLevels(levels, rate);
  const r: Resolved = {
    base: opts.base,
    finetuned: opts.finetuned,
    rate,
    method: parsePruneMethod(opts.method ?? DEFAULT_PRUNE_METHOD, 'method'),
    levels,
    significance: opts.significance ?? 'magnitude',
    layerOutlierFactor: opts.layerOutlierFactor ?? 5,
    linearOutlierFactor: opts.linearOutlierFactor ?? 5,
    lambda: opts.lambda ?? 0.08,
    layerPattern: opts.layerPattern ?? DEFAULT_LAYER_PATTERN,
    outside: parseOutsidePolicy(opts.outside ?? DEFAULT_OUTSIDE_POLICY, 'outside'),
    seed: opts.seed ?? 0,
    dareRescale: opts.dareRescale ?? 'inverse',
    valueDtype: opts.valueDtype,
    valueKind: opts.valueKind ?? 'auto',
    vocabMismatch: opts.vocabMismatch ?? 'error',
    workers: opts.workers ?? Math.min(2, availableParallelism()),
    signal: opts.signal,
    onProgress: opts.onProgress,
  };
  if (!['magnitude', 'count'].includes(r.significance))
    throw new RangeError(`significance: expected magnitude or count, got ${r.significance}`);
  if (!(r.lambda >= 0 && r.lambda <= 1)) throw new RangeError(`lambda: must be in [0, 1], got ${r.lambda}`);
  for (const k of ['layerOutlierFactor', 'linearOutlierFactor'] as const) {
    if (!(r[k] > 0)) throw new RangeError(`${k}: must be positive, got ${r[k]}`);
  }
  if (!Number.isInteger(r.workers) || r.workers < 1)
    throw new RangeError(`workers: must be a positive integer, got ${r.workers}`);
  if (!Number.isSafeInteger(r.seed)) throw new RangeError(`seed: must be an integer, got ${r.seed}`);
  if (r.valueDtype !== undefined && !(r.valueDtype in PRECISIONS))
    throw new RangeError(`valueDtype: expected bf16, f16 or f32, got ${r.valueDtype}`);
  if (r.valueKind !== 'delta' && r.valueKind !== 'auto')
    throw new RangeError(`valueKind: expected delta or auto, got ${String(r.valueKind)}`);
  compileLayerPattern(r.layerPattern);
  return r;
}

/** A prune in progress: the header is known, records are produced on demand. */
export interface PruneSession {
  readonly header: DeltaHeader;
  /** Filled in as `records()` produces each tensor. */
  readonly report: PruneReport;
  /**
   * The header, then each sent tensor's records in base order, pruning ahead
   * of the consumer by at most `workers + 1` tensors.
   * @param skip tensors not to produce (a resumed upload already holds them).
   */
  records(skip?: ReadonlySet<string>): AsyncGenerator<DeltaRecord>;
  /** Releases the checkpoints and workers. */
  close(): Promise<void>;
}

interface Planned {
  tensor: DeltaTensor;
  role: TensorRole;
  plan: TensorPlan;
  spec: PruneSpec | undefined;
}

/**
 * Opens both checkpoints, runs the significance pass and returns a session
 * whose header holds every tensor's rates.
 * @throws RangeError for bad options, CheckpointMismatchError, FormatError.
 */
export async function openPrune(options: PruneOptions): Promise<PruneSession> {
  const o = withDefaults(options);
  const source = await DeltaSource.open(o.base, o.finetuned, { vocabMismatch: o.vocabMismatch });
  const runner: TensorRunner =
    o.workers === 1
      ? inlineRunner(source)
      : workerRunner({ base: o.base, finetuned: o.finetuned, vocabMismatch: o.vocabMismatch }, o.workers);
  try {
    const pattern = compileLayerPattern(o.layerPattern);
    const roles = source.tensors.map((t) => ({ tensor: t, role: tensorRole(t.info.name, t.info.shape, pattern) }));
    const offsets = await rateOffsets(o, roles, runner);
    const planned = roles.map(({ tensor, role }) => planTensor(o, tensor, role, offsets.get(tensor.info.name) ?? 0));
    const form = valueForm(o, source, planned);
    const header: DeltaHeader = {
      formatVersion: formatVersionOf(form.kind),
      baseFingerprint: await baseFingerprint(source.base),
      // The text too, for readers older than prune_method (older servers compare it with their job's).
      method: o.method,
      rate: o.rate,
      levels: o.levels,
      options: methodOptions(o),
      valueDtype: PRECISIONS[form.dtype],
      tensors: planned.map((p) => p.plan),
      producer: 'dppa-federated',
      pruneMethod: pruneMethodToWire(o.method),
      outside: outsidePolicyToWire(o.outside),
      valueKind: form.kind,
    };
    const report: PruneReport = {
      method: o.method,
      rate: o.rate,
      levels: o.levels,
      tensors: [],
      droppedWhole: planned
        .filter((p) => p.role.kind === 'linear' && p.plan.levelRates.at(-1) === 1)
        .map((p) => p.plan.name),
      truncated: source.tensors.filter((t) => t.truncatedFrom !== undefined).map((t) => t.info.name),
    };
    return {
      header,
      report,
      records: (skip) => produce(o, header, planned, runner, report, skip ?? new Set()),
      close: async () => {
        await runner.close();
        await source.close();
      },
    };
  } catch (err) {
    await runner.close();
    await source.close();
    throw err;
  }
}

/** Dtypes each precision holds exactly. */
const HOLDS: Record<ValuePrecision, readonly Dtype[]> = { bf16: ['BF16'], f16: ['F16'], f32: ['F32', 'F16', 'BF16'] };

/**
 * What the kept values are and their precision: the fine-tuned weights when the method does not rescale them and
 * the precision holds every sent tensor's fine-tuned dtype exactly (then they cost no more than a delta of that
 * precision), deltas otherwise. See docs/design/pruning.md ("Values on the wire").
 */
function valueForm(
  o: Resolved,
  source: DeltaSource,
  planned: readonly Planned[],
): { dtype: ValuePrecision; kind: ValueKind } {
  const dtypes = new Set(planned.filter((p) => p.plan.sent).map((p) => source.finetuned.info(p.plan.name).dtype));
  const only = dtypes.size === 1 ? [...dtypes][0] : undefined;
  const dtype = o.valueDtype ?? (o.method !== 'dare' && only === 'F16' ? 'f16' : 'bf16');
  const exact =
    o.valueKind === 'auto' &&
    o.method !== 'dare' &&
    dtypes.size > 0 &&
    [...dtypes].every((d) => HOLDS[dtype].includes(d));
  return { dtype, kind: exact ? ValueKind.VALUE_KIND_FINETUNED : ValueKind.VALUE_KIND_UNSPECIFIED };
}

function methodOptions(o: Resolved): Record<string, string> {
  const opts: Record<string, string> = {
    outside: o.outside,
    layerPattern: o.layerPattern,
    vocabMismatch: o.vocabMismatch,
  };
  if (o.method === 'dp' || o.method === 'owl') {
    Object.assign(opts, { lambda: String(o.lambda), layerOutlierFactor: String(o.layerOutlierFactor) });
  }
  if (o.method === 'dp')
    Object.assign(opts, { significance: o.significance, linearOutlierFactor: String(o.linearOutlierFactor) });
  if (o.method === 'dare') Object.assign(opts, { seed: String(o.seed), rescale: o.dareRescale });
  return opts;
}

/**
 * The significance pass: per linear layer, its rate offset from the base rate.
 * Each linear layer is read once; its block's outliers come from the
 * candidates it returned, or from a second read when the block's threshold
 * falls below them.
 */
async function rateOffsets(
  o: Resolved,
  roles: { tensor: DeltaTensor; role: TensorRole }[],
  runner: TensorRunner,
): Promise<Map<string, number>> {
  if (o.method !== 'dp' && o.method !== 'owl') return new Map();
  const linears = roles.filter((r) => r.role.kind === 'linear');
  const progress = phaseProgress(
    o,
    'significance',
    linears.map((r) => r.tensor),
    1,
  );
  const layers = new Map<number, DeltaTensor[]>();
  for (const { tensor, role } of linears) layers.set(role.layer, [...(layers.get(role.layer) ?? []), tensor]);
  const kind: SignificanceKind = o.method === 'owl' ? 'count' : o.significance;
  const stats = new Map<string, TensorStats>();
  // Every tensor is queued at once; a block's candidates are dropped as soon as its outliers are counted.
  const perLayer = await Promise.all(
    [...layers].map(async ([layer, members]): Promise<[number, number]> => {
      const memberStats = await Promise.all(
        members.map(async (tensor) => {
          const s = await runner.run({
            op: 'stats',
            tensor,
            linearFactor: o.linearOutlierFactor,
            layerFactor: o.layerOutlierFactor,
          });
          progress(tensor);
          return s;
        }),
      );
      const totals = addTotals(memberStats.map((s) => s.totals));
      const threshold = outlierThreshold(totals, o.layerOutlierFactor);
      const outliers = await Promise.all(
        members.map(async (tensor, j) => {
          const { candidates, ...kept } = memberStats[j]!;
          stats.set(tensor.info.name, kept);
          return candidates !== undefined && threshold >= candidates.bound
            ? outliersAbove(candidates.magnitudes, threshold)
            : runner.run({ op: 'outliers', tensor, threshold });
        }),
      );
      return [layer, significance(totals, addTotals(outliers), kind)];
    }),
  );
  o.signal?.throwIfAborted();
  const layerSig = new Map(perLayer);

  if (o.method === 'owl') {
    const byLayer = owlOffsets(layerSig, o.lambda);
    return new Map(linears.map(({ tensor, role }) => [tensor.info.name, byLayer.get(role.layer)!]));
  }
  const linearSig = linears.map(({ tensor, role }) => {
    const s = stats.get(tensor.info.name)!;
    return {
      name: tensor.info.name,
      layer: role.layer,
      count: s.totals.count,
      significance: significance(s.totals, s.linearOutliers, o.significance),
    };
  });
  return new Map([...dpOffsets(layerSig, linearSig, o.lambda)].map(([name, d]) => [name, d.offset]));
}

function planTensor(o: Resolved, tensor: DeltaTensor, role: TensorRole, offset: number): Planned {
  const { info } = tensor;
  const shape = info.shape.map(BigInt);
  // base_sha256 is a merged patch's field: empty in a delta.
  const base = { name: info.name, shape, layer: role.layer, baseSha256: new Uint8Array(0) };
  if (role.kind === 'linear') {
    const levelRates = o.levels.map((a) => rateAt(a, offset));
    const spec: PruneSpec =
      o.method === 'dare'
        ? { kind: 'dare', levels: o.levels, seed: o.seed, rescale: o.dareRescale }
        : { kind: 'topk', keep: levelRates.map((r) => keptCount(info.numel, r)) };
    return { tensor, role, plan: { ...base, kind: TensorKind.TENSOR_KIND_LINEAR, levelRates, sent: true }, spec };
  }
  const outside = (sent: boolean, rate: number, spec: PruneSpec | undefined): Planned => ({
    tensor,
    role,
    plan: { ...base, kind: TensorKind.TENSOR_KIND_OUTSIDE, levelRates: o.levels.map(() => rate), sent },
    spec,
  });
  if (o.outside === 'skip') return outside(false, 1, undefined);
  if (o.outside === 'magnitude' && info.shape.length >= 2) {
    return outside(true, o.rate, { kind: 'outside-topk', keep: keptCount(info.numel, o.rate) });
  }
  return outside(true, 0, { kind: 'dense' });
}

function phaseProgress(
  o: Resolved,
  phase: PruneProgress['phase'],
  tensors: DeltaTensor[],
  passes: number,
): (t: DeltaTensor) => void {
  const tensorsTotal = tensors.length * passes;
  const bytesTotal = tensors.reduce((a, t) => a + 2 * t.info.byteLength, 0) * passes;
  let tensorsDone = 0;
  let bytesDone = 0;
  return (t) => {
    tensorsDone++;
    bytesDone += 2 * t.info.byteLength;
    o.onProgress?.({ phase, tensor: t.info.name, tensorsDone, tensorsTotal, bytesDone, bytesTotal });
  };
}

async function* produce(
  o: Resolved,
  header: DeltaHeader,
  planned: Planned[],
  runner: TensorRunner,
  report: PruneReport,
  skip: ReadonlySet<string>,
): AsyncGenerator<DeltaRecord> {
  yield { header };
  const todo = planned.filter((p) => p.spec !== undefined && !skip.has(p.plan.name));
  const progress = phaseProgress(
    o,
    'prune',
    todo.map((p) => p.tensor),
    1,
  );
  const start = (p: Planned): Promise<PrunedTensor> => {
    const f = runner.run({
      op: 'prune',
      tensor: p.tensor,
      spec: p.spec!,
      valueDtype: header.valueDtype,
      finetunedValues: header.valueKind === ValueKind.VALUE_KIND_FINETUNED,
    });
    // Awaited in order below; until then a rejection must not count as unhandled.
    f.catch(() => undefined);
    return f;
  };
  const window = o.workers + 1;
  const inFlight = todo.slice(0, window).map(start);
  for (let i = 0; i < todo.length; i++) {
    o.signal?.throwIfAborted();
    const p = todo[i]!;
    const pruned = await inFlight.shift()!;
    const next = todo[i + window];
    if (next !== undefined) inFlight.push(start(next));
    progress(p.tensor);
    const kept = pruned.keptPerPartition.reduce((a, b) => a + b, 0);
    report.tensors.push({
      name: p.plan.name,
      shape: [...p.tensor.info.shape],
      numel: p.tensor.info.numel,
      rate: p.plan.levelRates.at(-1)!,
      kept,
      keptPerPartition: pruned.keptPerPartition,
    });
    for (const r of pruned.records) yield r;
  }
}
