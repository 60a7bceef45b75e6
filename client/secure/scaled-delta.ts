/**
 * A party's contribution to a secure job, tensor by tensor: its kept positions (all partitions, ascending) and
 * the scaled values c·f_p·Δ on them, what the plain merge would add to the base for this party.
 */
import { partitionFactor } from '../../proto/algorithm/index.js';
import { FormatError } from '../../proto/errors.js';
import {
  carriesFinetuned,
  readDeltaFile,
  readDeltaHeader,
  shapeNumel,
  TensorAssembler,
} from '../../proto/sparse/index.js';

/** One tensor of a party's scaled delta. */
export interface ScaledTensor {
  name: string;
  shape: number[];
  /** Kept flat positions, strictly increasing (the tensor's support). */
  positions: Float64Array;
  /** c·f_p·Δ at each position, in float64 (as the merge forms the product before adding it). */
  values: Float64Array;
}

/** How the party scales its delta. */
export interface Scaling {
  /** One factor per partition, partition 1 first. */
  factors: readonly number[];
  /** The party's weight c in the merge. @default 1 */
  weight?: number;
  /** Partition 0 (outside tensors) takes the largest factor instead of 1. @default false */
  outsideByMax?: boolean;
}

/**
 * The tensors of a `.dppa` delta with their supports and scaled values, in the file's order.
 * @throws FormatError for a damaged delta; RangeError when the factors do not match its partitions.
 */
export async function* scaledTensors(
  delta: string,
  scaling: Scaling,
  signal?: AbortSignal,
): AsyncGenerator<ScaledTensor, void, undefined> {
  const opts = signal === undefined ? {} : { signal };
  const header = await readDeltaHeader(delta, opts);
  if (scaling.factors.length !== header.levels.length)
    throw new RangeError(
      `factors: the delta ${delta} has ${header.levels.length} partition(s), got ${scaling.factors.length} factor(s)`,
    );
  for (const f of scaling.factors) if (!Number.isFinite(f)) throw new RangeError(`factors: ${f} is not finite`);
  // Secure parties mask deltas: a file of fine-tuned weights (format 2) would mask F (prune with valueKind 'delta').
  if (carriesFinetuned(header))
    throw new FormatError('a secure upload needs deltas, and this file carries fine-tuned weights', { file: delta });
  const weight = scaling.weight ?? 1;
  let assembler: TensorAssembler | undefined;
  for await (const record of readDeltaFile(delta, opts)) {
    if (record.header !== undefined) continue;
    assembler ??= new TensorAssembler({ file: delta, entries: 'collect' });
    assembler.push(record);
    if (!assembler.complete) continue;
    const t = assembler.result();
    assembler = undefined;
    const runs = t.partitions.map((entries, p) => ({
      ...entries,
      scale: weight * partitionFactor(scaling.factors, p, scaling.outsideByMax ?? false),
    }));
    const { positions, values } = await mergeRuns(runs);
    yield { name: t.name, shape: t.shape.map(Number), positions, values };
  }
  if (assembler !== undefined) throw new FormatError('the delta ends inside a tensor', { file: delta });
}

/** The positions of every tensor of a delta (its support), in the file's order, with their element counts. */
export async function* supportOf(
  delta: string,
  signal?: AbortSignal,
): AsyncGenerator<{ name: string; numel: number; positions: Float64Array }, void, undefined> {
  const header = await readDeltaHeader(delta, signal === undefined ? {} : { signal });
  for await (const t of scaledTensors(delta, { factors: header.levels.map(() => 1) }, signal))
    yield { name: t.name, numel: shapeNumel(t.shape), positions: t.positions };
}

/** Entries merged between two yields of {@link mergeRuns}. */
const SLICE = 1 << 20;

/**
 * Sorted runs (one per partition; disjoint) merged into one ascending list, each value scaled by its run's scale:
 * in slices, yielding between them, so that a tensor of millions of entries does not block the event loop (an
 * upload whose keepalive pings go unanswered is dropped by the server).
 */
async function mergeRuns(runs: readonly { positions: Float64Array; values: Float32Array; scale: number }[]): Promise<{
  positions: Float64Array;
  values: Float64Array;
}> {
  const total = runs.reduce((n, r) => n + r.positions.length, 0);
  const positions = new Float64Array(total);
  const values = new Float64Array(total);
  const at = runs.map(() => 0);
  for (let n = 0; n < total; n++) {
    if (n % SLICE === SLICE - 1) await new Promise((resolve) => setImmediate(resolve));
    let best = -1;
    for (let r = 0; r < runs.length; r++) {
      const i = at[r]!;
      if (i < runs[r]!.positions.length && (best < 0 || runs[r]!.positions[i]! < runs[best]!.positions[at[best]!]!))
        best = r;
    }
    const run = runs[best]!;
    const i = at[best]!++;
    if (n > 0 && run.positions[i]! <= positions[n - 1]!)
      throw new FormatError(`position ${run.positions[i]} kept in two partitions`);
    positions[n] = run.positions[i]!;
    values[n] = run.scale * run.values[i]!;
  }
  return { positions, values };
}
