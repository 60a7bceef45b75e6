/** Job calls: create, inspect, list, watch, cancel and resume merge jobs. */
import { status as Status } from '@grpc/grpc-js';
import {
  DEFAULT_PRUNE_METHOD,
  parsePruneMethod,
  pruneMethodToWire,
  type PruneMethod,
} from '../../proto/algorithm/index.js';
import {
  CreateJobRequest,
  DpaConfig,
  JobState,
  MergeOptions,
  Privacy,
  type DeepPartial,
  type Job,
  type JobEvent,
} from '../../proto/gen/dppa/v1/jobs.js';
import { CallScope, readStream, unary, type CallOptions } from './call.js';
import type { Connection } from './connection.js';
import { DppaRpcError } from './errors.js';
import { isTransient } from './retry.js';

/** A job's state as a lower-case word, the form the CLI prints. */
export type JobStateName = 'collecting' | 'dpa' | 'merging' | 'merged' | 'failed' | 'unspecified';

/** The lower-case name of a job state: `JobState.JOB_STATE_MERGED` → `merged`. */
export function jobStateName(state: JobState): JobStateName {
  switch (state) {
    case JobState.JOB_STATE_COLLECTING:
      return 'collecting';
    case JobState.JOB_STATE_DPA:
      return 'dpa';
    case JobState.JOB_STATE_MERGING:
      return 'merging';
    case JobState.JOB_STATE_MERGED:
      return 'merged';
    case JobState.JOB_STATE_FAILED:
      return 'failed';
    default:
      return 'unspecified';
  }
}

/** Settings of a new job (see `CreateJobRequest` in proto/dppa/v1/jobs.proto). */
export interface CreateJobOptions {
  /** Folder of the base checkpoint on the server's disk. */
  basePath: string;
  /** Party names: letters, digits, `-`, `_`, at most 64 characters each; at least one, no repeats. */
  parties: string[];
  /** Target pruning rate every party must use, in [0, 1). */
  rate: number;
  /** Pruning method every party must use. @default 'dp' */
  method?: PruneMethod;
  /** How the per-partition factors are obtained; set exactly one of `off`, `fixed`, `search`. @default { off: true } (DP alone) */
  dpa?: DeepPartial<DpaConfig>;
  /** Merge settings. @default weights 1, no sign election, parties may not download */
  merge?: DeepPartial<MergeOptions>;
  /** Human-readable label. @default none */
  label?: string;
  /**
   * Largest magnitude an uploaded delta value may have: a tensor holding a larger value,
   * NaN or ±Inf is refused at upload (docs/server.md says why the default suits real fine-tunes).
   * @default the server's default, 1000
   */
  maxAbsValue?: number;
  /**
   * Secure aggregation (docs/privacy.md): the server learns the sum of the parties' scaled deltas, not any one of
   * them. Each party then searches and applies its own factors and weight; `dpa` must be off (or fixed at 1) and
   * the weights 1. @default plain
   */
  secure?: SecureJobOptions;
}

/** The parameters of a secure job. */
export interface SecureJobOptions {
  /** Shares needed to rebuild a secret: at least this many parties must stay to the end; 2 ≤ t ≤ parties. */
  threshold: number;
  /** Clipping bound B of the scaled values c·f·Δ each party sums (beyond it they are clipped and counted). @default 1 */
  clipBound?: number;
  /** Seconds each phase waits for parties that have not answered. @default the server's, 600 */
  phaseSeconds?: number;
}

/** Default of {@link SecureJobOptions.clipBound}. */
export const DEFAULT_CLIP_BOUND = 1;

/** What {@link DppaClient.createJob} returns. */
export interface CreateJobResult {
  /** The new job, in state COLLECTING. */
  job: Job;
  /** Party name → bearer token. Returned only once: hand each party its own. */
  tokens: Record<string, string>;
}

/** Options of {@link DppaClient.watchJob}. */
export interface WatchJobOptions extends CallOptions {
  /** Only events after this sequence number. @default 0n (every event from the start) */
  afterSeq?: bigint;
}

const PARTY_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * Checks job settings and builds the request.
 * @throws RangeError naming the field that is wrong.
 */
export function createJobRequest(o: CreateJobOptions): CreateJobRequest {
  if (o.basePath === '') throw new RangeError('basePath: required (the base checkpoint folder on the server)');
  if (o.parties.length === 0) throw new RangeError('parties: at least one party is needed');
  const seen = new Set<string>();
  for (const p of o.parties) {
    if (!PARTY_NAME.test(p))
      throw new RangeError(`parties: ${JSON.stringify(p)} is not a party name (letters, digits, '-', '_', at most 64)`);
    if (seen.has(p)) throw new RangeError(`parties: ${JSON.stringify(p)} is given twice`);
    seen.add(p);
  }
  if (!(o.rate >= 0 && o.rate < 1)) throw new RangeError(`rate: must be in [0, 1), got ${o.rate}`);
  const method = parsePruneMethod(o.method ?? DEFAULT_PRUNE_METHOD, 'method');
  if (o.maxAbsValue !== undefined && !(o.maxAbsValue > 0 && Number.isFinite(o.maxAbsValue))) {
    throw new RangeError(`maxAbsValue: must be a finite number > 0, got ${o.maxAbsValue}`);
  }
  const dpa = DpaConfig.fromPartial(o.dpa ?? { off: true });
  const modes = [dpa.off, dpa.fixed, dpa.search].filter((m) => m !== undefined).length;
  if (modes !== 1) throw new RangeError(`dpa: set exactly one of off, fixed, search (${modes} set)`);
  const merge = MergeOptions.fromPartial(o.merge ?? {});
  for (const name of Object.keys(merge.weights)) {
    if (!seen.has(name)) throw new RangeError(`merge.weights: ${JSON.stringify(name)} is not a party of the job`);
  }
  const perParty: [string, Record<string, unknown> | undefined][] = [
    ['dpa.fixed.perParty', dpa.fixed?.perParty],
    ['dpa.search.partyEvaluator', dpa.search?.partyEvaluator],
    ['dpa.search.onnx.partyTasks', dpa.search?.onnx?.partyTasks],
    ['dpa.search.onnx.partyFinetuned', dpa.search?.onnx?.partyFinetuned],
  ];
  for (const [field, map] of perParty) {
    for (const name of Object.keys(map ?? {})) {
      if (!seen.has(name)) throw new RangeError(`${field}: ${JSON.stringify(name)} is not a party of the job`);
    }
  }
  const secure = o.secure === undefined ? undefined : checkSecure(o.secure, o.parties.length, dpa, merge);
  return CreateJobRequest.fromPartial({
    ...(secure === undefined ? {} : secure),
    basePath: o.basePath,
    parties: o.parties,
    rate: o.rate,
    // The text too, for servers older than prune_method.
    method,
    pruneMethod: pruneMethodToWire(method),
    dpa,
    merge,
    label: o.label ?? '',
    maxAbsValue: o.maxAbsValue ?? 0,
  });
}

/**
 * The secure fields of a request.
 * @throws RangeError naming the option that is wrong or that a secure job refuses.
 */
function checkSecure(
  s: SecureJobOptions,
  parties: number,
  dpa: DpaConfig,
  merge: MergeOptions,
): Pick<CreateJobRequest, 'privacy' | 'threshold' | 'clipBound' | 'securePhaseSeconds'> {
  if (!(Number.isInteger(s.threshold) && s.threshold >= 2 && s.threshold <= parties))
    throw new RangeError(`secure.threshold: must be an integer in [2, ${parties}] (the parties), got ${s.threshold}`);
  const clipBound = s.clipBound ?? DEFAULT_CLIP_BOUND;
  if (!(Number.isFinite(clipBound) && clipBound > 0))
    throw new RangeError(`secure.clipBound: must be a finite number > 0, got ${clipBound}`);
  const phaseSeconds = s.phaseSeconds ?? 0;
  if (!(Number.isInteger(phaseSeconds) && phaseSeconds >= 0))
    throw new RangeError(`secure.phaseSeconds: must be an integer ≥ 0, got ${phaseSeconds}`);
  if (dpa.search !== undefined)
    throw new RangeError(
      'dpa.search: a secure job searches no factors on the server (ONNX or remote evaluator); each party searches its own locally when it pushes: give dpa off',
    );
  const fixed = dpa.fixed;
  if (
    fixed !== undefined &&
    [fixed.factors, ...Object.values(fixed.perParty).map((f) => f.factors)].flat().some((f) => f !== 1)
  )
    throw new RangeError(
      'dpa.fixed: a secure job takes no factors at the server; each party applies its own when it pushes',
    );
  for (const [party, w] of Object.entries(merge.weights))
    if (w !== 1)
      throw new RangeError(
        `merge.weights: a secure job takes no weights at the server (${party}: ${w}); each party applies its own when it pushes`,
      );
  if (merge.signElection)
    throw new RangeError("merge.signElection: a secure job's server sees only the sum, not each party's signs");
  return { privacy: Privacy.PRIVACY_SECURE, threshold: s.threshold, clipBound, securePhaseSeconds: phaseSeconds };
}

/** CreateJob (admin token). Not retried: a repeat could create a second job. */
export async function createJob(
  conn: Connection,
  o: CreateJobOptions,
  opts: CallOptions = {},
): Promise<CreateJobResult> {
  const req = createJobRequest(o);
  const res = await unary(conn, 'CreateJob', conn.jobs.createJob.bind(conn.jobs), req, opts, false);
  if (res.job === undefined) throw new DppaRpcError('CreateJob', Status.INTERNAL, 'the server answered without a job');
  return { job: res.job, tokens: { ...res.tokens } };
}

/** GetJob (admin token or a party token of the job). */
export function getJob(conn: Connection, jobId: string, opts: CallOptions = {}): Promise<Job> {
  return unary(conn, 'GetJob', conn.jobs.getJob.bind(conn.jobs), { jobId }, opts, true);
}

/** ListJobs (admin token): every job, newest first. */
export async function listJobs(conn: Connection, opts: CallOptions = {}): Promise<Job[]> {
  const res = await unary(conn, 'ListJobs', conn.jobs.listJobs.bind(conn.jobs), {}, opts, true);
  return res.jobs;
}

/** CancelJob (admin token). Not retried: a repeat after a lost answer would fail on the already failed job. */
export function cancelJob(conn: Connection, jobId: string, reason: string, opts: CallOptions = {}): Promise<Job> {
  return unary(conn, 'CancelJob', conn.jobs.cancelJob.bind(conn.jobs), { jobId, reason }, opts, false);
}

/** ResumeJob (admin token). Retried: a repeat only asks for the same attempt again. */
export function resumeJob(conn: Connection, jobId: string, opts: CallOptions = {}): Promise<Job> {
  return unary(conn, 'ResumeJob', conn.jobs.resumeJob.bind(conn.jobs), { jobId }, opts, true);
}

/**
 * WatchJob as an async generator. Reconnects after a transient failure from
 * the last event seen, so no event is lost or repeated; ends when the server
 * ends the stream (the job merged or failed). Breaking out of the loop, or the
 * signal aborting, cancels the call.
 */
export async function* watchJob(
  conn: Connection,
  jobId: string,
  opts: WatchJobOptions = {},
): AsyncGenerator<JobEvent, void, undefined> {
  const scope = new CallScope('WatchJob', opts);
  const backoff = conn.backoff();
  let afterSeq = opts.afterSeq ?? 0n;
  try {
    for (;;) {
      scope.check();
      try {
        const call = conn.jobs.watchJob(
          { jobId, afterSeq },
          conn.metadata(),
          scope.deadline !== undefined ? { deadline: new Date(scope.deadline) } : {},
        );
        for await (const event of readStream(call, scope.signal)) {
          afterSeq = event.seq;
          backoff.reset();
          yield event;
        }
        return;
      } catch (err) {
        const e = DppaRpcError.from(scope.reason(err), 'WatchJob');
        if (scope.signal.aborted || !isTransient(e)) throw e;
        await backoff.failed(e, scope.signal);
      }
    }
  } finally {
    scope.dispose();
  }
}
