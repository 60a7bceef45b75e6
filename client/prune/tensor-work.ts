/**
 * The work done on one tensor's delta, the same whether it runs in a worker
 * thread or inline: significance statistics, outlier totals at a given
 * threshold, and the pruning itself into partitioned sparse records.
 */
import type { DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import type { ValueDtype } from '../../proto/gen/dppa/v1/sparse.js';
import { tensorRecords, type PartitionEntries } from '../../proto/sparse/index.js';
import { darePartitions, type DareRescale } from './dare.js';
import { ReusedArrays } from './reused-arrays.js';
import { selectPartitions } from './select.js';
import {
  magnitudeTotals,
  outliersAndCandidates,
  outlierThreshold,
  type MagnitudeTotals,
  type OutlierCandidates,
  type OutlierTotals,
} from './significance.js';

/** Significance statistics of one linear layer's delta. */
export interface TensorStats {
  totals: MagnitudeTotals;
  /** Outliers at `N_linear · mean(|Δ|)` of the tensor itself. */
  linearOutliers: OutlierTotals;
  /**
   * Magnitudes above half the tensor's own block-level threshold
   * (`N_layer · mean(|Δ|) / 2`), for the block-level outliers; absent when
   * more than an eighth of the entries exceed it.
   */
  candidates?: OutlierCandidates | undefined;
}

/** How to prune one tensor. */
export type PruneSpec =
  /** Linear layer: top-k by magnitude at each level; partitions 1..P. */
  | { kind: 'topk'; keep: number[] }
  /** Linear layer under DARE: random drop per level; partitions 1..P. */
  | { kind: 'dare'; levels: number[]; seed: number; rescale: DareRescale }
  /** Outside tensor kept whole: partition 0. */
  | { kind: 'dense' }
  /** Outside tensor pruned by magnitude at the target rate: partition 0. */
  | { kind: 'outside-topk'; keep: number };

/** The records of one pruned tensor and its kept counts per partition (index 0: outside). */
export interface PrunedTensor {
  name: string;
  records: DeltaRecord[];
  keptPerPartition: number[];
}

/**
 * Statistics for the significance pass. The block's threshold falls below the
 * candidates' bound only when the block's mean is under half of this tensor's;
 * otherwise the candidates spare a second read for the block level.
 */
export function tensorStats(delta: Float32Array, linearFactor: number, layerFactor: number): TensorStats {
  const totals = magnitudeTotals(delta);
  const { outliers, candidates } = outliersAndCandidates(
    delta,
    outlierThreshold(totals, linearFactor),
    outlierThreshold(totals, layerFactor) / 2,
    Math.ceil(delta.length / 8),
  );
  return { totals, linearOutliers: outliers, candidates };
}

/** Selection buffers of this thread: a worker prunes one tensor at a time, and inline mode too. */
const selectArrays = new ReusedArrays();

/**
 * Prunes one tensor's delta and encodes it as records (begin, chunks, end).
 * @param finetuned - The fine-tuned weights F: when given, the kept entries carry F instead of Δ
 *   (VALUE_KIND_FINETUNED; never with DARE, whose values are rescaled).
 */
export function pruneTensor(
  name: string,
  shape: readonly number[],
  delta: Float32Array,
  spec: PruneSpec,
  valueDtype: ValueDtype,
  finetuned?: Float32Array,
): PrunedTensor {
  if (finetuned !== undefined && spec.kind === 'dare')
    throw new RangeError(`tensor "${name}": DARE's rescaled values travel as deltas, not fine-tuned weights`);
  let partitions: PartitionEntries[];
  let first: number;
  switch (spec.kind) {
    case 'topk':
      partitions = selectPartitions(delta, spec.keep, name, selectArrays);
      first = 1;
      break;
    case 'dare':
      partitions = darePartitions(delta, spec.levels, { seed: spec.seed, tensor: name, rescale: spec.rescale });
      first = 1;
      break;
    case 'dense': {
      const positions = new Float64Array(delta.length);
      for (let i = 0; i < positions.length; i++) positions[i] = i;
      partitions = [{ positions, values: finetuned ?? delta }];
      first = 0;
      break;
    }
    case 'outside-topk':
      partitions = selectPartitions(delta, [spec.keep], name, selectArrays);
      first = 0;
      break;
  }
  // Selected on Δ, sent as F: the values are replaced where they were selected (the dense case reads F whole).
  if (finetuned !== undefined && spec.kind !== 'dense') for (const p of partitions) takeValuesOf(p, finetuned);
  // Index p of the list is partition p; linear layers have nothing in partition 0.
  const all =
    first === 1 ? [{ positions: new Float64Array(0), values: new Float32Array(0) }, ...partitions] : partitions;
  const records = [...tensorRecords(name, shape, all, { valueDtype })];
  const keptPerPartition = all.map((p) => p.positions.length);
  return { name, records, keptPerPartition };
}

/** Replaces the values of `p` (in place) by those of `source` at the same positions. */
function takeValuesOf(p: PartitionEntries, source: Float32Array): void {
  const { positions, values } = p;
  for (let i = 0; i < positions.length; i++) values[i] = source[positions[i]!]!;
}
