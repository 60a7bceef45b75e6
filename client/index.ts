/**
 * The client SDK of dppa-federated: prune a fine-tuned delta (DP and the
 * baselines), write and read `.dppa` files, apply a delta to its base.
 *
 * This is the package's one public entry; everything else under client/ is internal.
 * @packageDocumentation
 */
export { openPrune, withDefaults as pruneDefaults } from './prune/pruner.js';
export type { PruneOptions, PruneProgress, PruneReport, PruneSession, TensorReport, PruneMethod, OutsidePolicy, ValuePrecision } from './prune/pruner.js';
export { pruneToFile } from './prune/prune-to-file.js';
export type { PruneToFileOptions, PruneFileReport } from './prune/prune-to-file.js';
export { CheckpointMismatchError } from './prune/delta-source.js';
export type { VocabMismatch } from './prune/delta-source.js';
export type { SignificanceKind } from './prune/significance.js';
export type { DareRescale } from './prune/dare.js';
export { applyDelta } from './apply.js';
export type { ApplyOptions, ApplyReport } from './apply.js';
export { inspectDelta } from './inspect.js';
export type { DeltaSummary, TensorSummary } from './inspect.js';
export { ratePlotSvg } from './rate-plot.js';
export { FormatError, ChecksumError, TruncatedError, UnsupportedDtypeError } from '../proto/errors.js';
