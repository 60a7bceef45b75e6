/**
 * The client SDK of dppa-federated: prune a fine-tuned delta (DP and the
 * baselines), write and read `.dppa` files, apply a delta to its base, and
 * talk to an aggregation server ({@link DppaClient}: jobs, uploads, evaluations
 * for the DPA search, downloads).
 *
 * This is the package's one public entry; everything else under client/ is internal.
 * @packageDocumentation
 */
export { openPrune, withDefaults as pruneDefaults } from './prune/pruner.js';
export type {
  PruneOptions,
  PruneProgress,
  PruneReport,
  PruneSession,
  TensorReport,
  PruneMethod,
  OutsidePolicy,
  ValuePrecision,
} from './prune/pruner.js';
export { PRUNE_METHODS, OUTSIDE_POLICIES, UnknownValueError } from '../proto/algorithm/index.js';
export { pruneToFile } from './prune/prune-to-file.js';
export type { PruneToFileOptions, PruneFileReport } from './prune/prune-to-file.js';
export { CheckpointMismatchError } from './prune/delta-source.js';
export type { VocabMismatch } from './prune/delta-source.js';
export type { SignificanceKind } from './prune/significance.js';
export type { DareRescale } from './prune/dare.js';
export { applyDelta } from './apply.js';
export { applyPatch, PatchBaseMismatchError } from '../proto/patch/index.js';
export type { ApplyPatchOptions, ApplyPatchReport } from '../proto/patch/index.js';
export type { ApplyOptions, ApplyReport } from './apply.js';
export { inspectDelta } from './inspect.js';
export type { DeltaSummary, TensorSummary } from './inspect.js';
export { ratePlotSvg } from './rate-plot.js';
export { FormatError, ChecksumError, TruncatedError, UnsupportedDtypeError } from '../proto/errors.js';
export { DppaClient } from './sdk/client.js';
export type { DppaClientOptions, TlsOptions, PemSource } from './sdk/connection.js';
export { isLoopbackHost } from './sdk/connection.js';
export type { CallOptions } from './sdk/call.js';
export type { RetryOptions } from './sdk/retry.js';
export { DEFAULT_RETRY } from './sdk/retry.js';
export { checkHealth } from './sdk/health.js';
export type { HealthCheckOptions, ServingStatusName } from './sdk/health.js';
export type { TransportOptions } from './sdk/connection.js';
export { jobStateName } from './sdk/jobs.js';
export type { CreateJobOptions, CreateJobResult, JobStateName, WatchJobOptions } from './sdk/jobs.js';
export type {
  PushOptions,
  PushFromCheckpoints,
  PushFromFile,
  PushPruneOptions,
  PushProgress,
  PushCallOptions,
} from './sdk/push.js';
export type { SecurePushOptions, SecureProgress } from './sdk/secure-push.js';
export type { SecureJobOptions } from './sdk/jobs.js';
export { DEFAULT_CLIP_BOUND } from './sdk/jobs.js';
export { searchLocally } from './secure/local-search.js';
export type { LocalSearchOptions, LocalSearchResult, LocalSearchEvent } from './secure/local-search.js';
export type { PullOptions, PullProgress, PullCallOptions, PullResult, PulledFile } from './sdk/pull.js';
export type {
  EvaluateOptions,
  EvaluateCallOptions,
  EvaluateResult,
  EvaluateEvent,
  EvaluateFn,
  EvaluationCandidate,
} from './sdk/evaluate.js';
export {
  DppaRpcError,
  DeltaMismatchError,
  JobStateError,
  UploadIncompleteError,
  DownloadError,
  EvaluationError,
} from './sdk/errors.js';
export {
  JobState,
  SearchMethod,
  Tuner,
  EvaluatorKind,
  MergeOutput,
  Privacy,
  SecurePhase,
} from '../proto/gen/dppa/v1/jobs.js';
export type {
  Job,
  JobEvent,
  PartyStatus,
  Evaluation,
  DpaConfig,
  FixedFactors,
  SearchConfig,
  OnnxEvaluator,
  MergeOptions,
} from '../proto/gen/dppa/v1/jobs.js';
export type { UploadState } from '../proto/gen/dppa/v1/upload.js';
export type { MergedFile } from '../proto/gen/dppa/v1/download.js';
export { status as GrpcStatus } from '@grpc/grpc-js';
