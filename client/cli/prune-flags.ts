/** The pruning flags shared by `dppa prune` and `dppa push` (which prunes on the fly). */
import { OUTSIDE_POLICIES, PRUNE_METHODS } from '../../proto/algorithm/index.js';
import type { PruneOptions } from '../prune/pruner.js';
import { defined, num, numList, oneOf } from './args.js';

/** parseArgs options of the pruning settings (besides --base, --finetuned and --rate). */
export const pruneFlags = {
  method: { type: 'string' },
  levels: { type: 'string' },
  outside: { type: 'string' },
  significance: { type: 'string' },
  lambda: { type: 'string' },
  'layer-outlier-factor': { type: 'string' },
  'linear-outlier-factor': { type: 'string' },
  'layer-pattern': { type: 'string' },
  seed: { type: 'string' },
  'dare-rescale': { type: 'string' },
  'value-dtype': { type: 'string' },
  'vocab-mismatch': { type: 'string' },
  workers: { type: 'string' },
} as const;

/** Values of {@link pruneFlags}, as parseArgs returns them. */
export type PruneFlagValues = { [K in keyof typeof pruneFlags]?: string | undefined };

/** The pruning settings given on the command line (absent ones stay absent). */
export function pruneSettings(v: PruneFlagValues): Omit<PruneOptions, 'base' | 'finetuned' | 'rate' | 'signal' | 'onProgress'> {
  return defined({
    method: oneOf(v.method, 'method', PRUNE_METHODS),
    levels: numList(v.levels, 'levels'),
    outside: oneOf(v.outside, 'outside', OUTSIDE_POLICIES),
    significance: oneOf(v.significance, 'significance', ['magnitude', 'count'] as const),
    lambda: num(v.lambda, 'lambda', { min: 0, max: 1 }),
    layerOutlierFactor: num(v['layer-outlier-factor'], 'layer-outlier-factor', { min: 0 }),
    linearOutlierFactor: num(v['linear-outlier-factor'], 'linear-outlier-factor', { min: 0 }),
    layerPattern: v['layer-pattern'],
    seed: num(v.seed, 'seed', { integer: true }),
    dareRescale: oneOf(v['dare-rescale'], 'dare-rescale', ['inverse', 'l1'] as const),
    valueDtype: oneOf(v['value-dtype'], 'value-dtype', ['bf16', 'f16', 'f32'] as const),
    vocabMismatch: oneOf(v['vocab-mismatch'], 'vocab-mismatch', ['error', 'truncate'] as const),
    workers: num(v.workers, 'workers', { min: 1, integer: true }),
  });
}
