/** The pruning flags shared by `dppa prune` and `dppa push` (which prunes on the fly). */
import { choice, number, numbers, text, type FlagValues } from '../../proto/cli/flag-table.js';
import { OUTSIDE_POLICIES, PRUNE_METHODS } from '../../proto/algorithm/index.js';
import type { PruneOptions } from '../prune/pruner.js';
import { defined } from './args.js';

const METHOD = 'Method';

/** The `--method` flag (prune, push; job create has its own text). */
export const methodFlag = choice('M', PRUNE_METHODS, `${PRUNE_METHODS.join(', ')} (default dp)`, { group: METHOD });

/** The pruning settings (besides --base, --finetuned and --rate). */
export const pruneFlags = {
  method: methodFlag,
  levels: numbers(
    'L1,L2,...',
    'partition levels, decreasing, ending at --rate (default 0.9, 0.8, ... down to R)',
    {},
    { group: METHOD },
  ),
  outside: choice(
    'P',
    OUTSIDE_POLICIES,
    'outside tensors (embeddings, norms, lm_head): dense (default), magnitude, skip',
    { group: METHOD },
  ),
  significance: choice(
    'K',
    ['magnitude', 'count'] as const,
    'DP significance: magnitude (default, the paper) or count (released code)',
    { group: METHOD },
  ),
  lambda: number('X', 'largest rate fluctuation (default 0.08)', { min: 0, max: 1 }, { group: METHOD }),
  'layer-outlier-factor': number(
    'N',
    'outlier factor at model-layer level (default 5; the released code used 3)',
    { min: 0 },
    { group: METHOD },
  ),
  'linear-outlier-factor': number(
    'N',
    'outlier factor at linear-layer level (default 5)',
    { min: 0 },
    { group: METHOD },
  ),
  'layer-pattern': text(
    'RE',
    'regular expression whose group 1 is the layer number (default matches layers.N., h.N. and blocks.N.)',
    { group: METHOD },
  ),
  seed: number('N', 'DARE seed (default 0)', { integer: true }, { group: METHOD }),
  'dare-rescale': choice(
    'R',
    ['inverse', 'l1'] as const,
    'inverse (default, 1/(1-p)) or l1 (match the L1 norm, as mergekit)',
    { group: METHOD },
  ),
  'value-dtype': choice(
    'D',
    ['bf16', 'f16', 'f32'] as const,
    "bf16, f16, f32 (default f16 for an all-f16 checkpoint, else bf16); the fine-tuned weights travel exactly when it holds the checkpoint's dtype and the method is not dare, deltas otherwise",
    { group: METHOD },
  ),
  'value-kind': choice(
    'K',
    ['delta', 'auto'] as const,
    'auto (default): send the fine-tuned weights when --value-dtype holds them exactly (format version 2); delta: always send deltas F - B (format version 1, for servers older than format version 2). push sends deltas to a secure job or one whose max_abs_value is below the default 1000, whatever this says',
    { group: METHOD },
  ),
  'vocab-mismatch': choice(
    'M',
    ['error', 'truncate'] as const,
    "error (default) or truncate: compare only the base's rows of tensors whose fine-tuned copy has extra rows (resized vocabulary)",
    { group: METHOD },
  ),
  workers: number(
    'N',
    'worker threads (default: up to 2); results do not depend on it',
    { min: 1, integer: true },
    { group: METHOD },
  ),
};

/** Values of {@link pruneFlags}. */
export type PruneFlagValues = FlagValues<typeof pruneFlags>;

/** The pruning settings given on the command line (absent ones stay absent). */
export function pruneSettings(
  v: PruneFlagValues,
): Omit<PruneOptions, 'base' | 'finetuned' | 'rate' | 'signal' | 'onProgress'> {
  return defined({
    method: v.method,
    levels: v.levels,
    outside: v.outside,
    significance: v.significance,
    lambda: v.lambda,
    layerOutlierFactor: v['layer-outlier-factor'],
    linearOutlierFactor: v['linear-outlier-factor'],
    layerPattern: v['layer-pattern'],
    seed: v.seed,
    dareRescale: v['dare-rescale'],
    valueDtype: v['value-dtype'],
    valueKind: v['value-kind'],
    vocabMismatch: v['vocab-mismatch'],
    workers: v.workers,
  });
}
