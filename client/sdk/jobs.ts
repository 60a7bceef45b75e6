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
}

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
  return CreateJobRequest.fromPartial({
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
