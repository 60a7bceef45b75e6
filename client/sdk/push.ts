/**
 * Upload of one party's pruned delta: pruned on the fly from the two
 * checkpoints (pruning the next tensors while earlier ones are on the wire) or
 * read from a `.dppa` file; resumable tensor by tensor after a dropped stream.
 */
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { status as Status, type ClientWritableStream } from '@grpc/grpc-js';
import { DEFAULT_PRUNE_METHOD, pruneMethodFromWire, type PruneMethod } from '../../proto/algorithm/index.js';
import { JobState, Privacy, type Job } from '../../proto/gen/dppa/v1/jobs.js';
import { ValueKind, type DeltaHeader, type DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import type { UploadRequest, UploadState } from '../../proto/gen/dppa/v1/upload.js';
import { DEFAULT_MAX_ABS_VALUE, readDeltaFile, readDeltaHeader } from '../../proto/sparse/index.js';
import { pruneToFile } from '../prune/prune-to-file.js';
import { openPrune, type PruneOptions, type PruneProgress, type ValueKindChoice } from '../prune/pruner.js';
import { CallScope, inScope, type CallOptions } from './call.js';
import type { Connection } from './connection.js';
import { DeltaMismatchError, DppaRpcError, JobStateError, UploadIncompleteError } from './errors.js';
import { jobStateName } from './jobs.js';
import { isTransient } from './retry.js';
import { pushSecure, type SecureProgress, type SecurePushOptions } from './secure-push.js';

/** Pruning settings a push passes to the pruner (see {@link PruneOptions}); the job fixes rate and method. */
export type PushPruneOptions = Omit<PruneOptions, 'base' | 'finetuned' | 'rate' | 'method' | 'signal' | 'onProgress'>;

/** Push a delta pruned on the fly from the party's two checkpoints. */
export interface PushFromCheckpoints extends PushPruneOptions {
  /** Id of the job. */
  jobId: string;
  /** This party's name in the job (the token must be this party's). */
  party: string;
  /** Folder of the base checkpoint (the same base as the job's). */
  base: string;
  /** Folder of the party's fine-tuned checkpoint. */
  finetuned: string;
  /** Pruning rate; must equal the job's. @default the job's rate */
  rate?: number;
  /** Pruning method; must equal the job's. @default the job's method */
  method?: PruneMethod;
  /**
   * Keep the pruned delta in this `.dppa` file, so that a DPA search evaluates
   * the very delta that was uploaded ({@link DppaClient.evaluate}). The delta is
   * then pruned into the file first and uploaded from it. A file already there
   * that fits the job (base, rate, method) is uploaded as it is, so a push run
   * again does not prune again; any other file there is replaced.
   * @default none: pruned on the fly, nothing kept
   */
  keepDelta?: string;
  delta?: never;
  /** Used when the job is secure (docs/privacy.md): the party's working folder, its evaluation, its weight. */
  secure?: SecurePushOptions;
}

/** Push a delta already pruned into a `.dppa` file (`dppa prune`). */
export interface PushFromFile {
  /** Id of the job. */
  jobId: string;
  /** This party's name in the job (the token must be this party's). */
  party: string;
  /** The `.dppa` file; its rate, method and base fingerprint must match the job's. */
  delta: string;
  base?: never;
  finetuned?: never;
  keepDelta?: never;
  /** Used when the job is secure (docs/privacy.md): the party's working folder, its evaluation, its weight. */
  secure?: SecurePushOptions;
}

/** What {@link DppaClient.push} uploads. */
export type PushOptions = PushFromCheckpoints | PushFromFile;

/** Progress of a push. */
export interface PushProgress {
  /** `prepare`: work before any upload (the significance pass of DP/OWL; with `keepDelta`, the whole pruning); `upload`: records on the wire. */
  phase: 'prepare' | 'upload';
  /** The tensor last processed (prepare) or last sent completely (upload; empty before the first). */
  tensor: string;
  /** Tensors done: significance pass (prepare), or held by the server plus sent since (upload). */
  tensorsDone: number;
  /** Tensors in all for the phase. */
  tensorsTotal: number;
  /** Chunk payload bytes (positions and values) sent by this push so far, every attempt counted. */
  bytesSent: number;
  /** Upload attempt, from 1; above 1 after a dropped stream. */
  attempt: number;
}

/** Call options of {@link DppaClient.push}. */
export interface PushCallOptions extends CallOptions {
  /** Called as the push advances (at most once per tensor). @default none */
  onProgress?: ((p: PushProgress) => void) | undefined;
  /** Called as a secure job's rounds advance (local search, keys, shares, masked upload, unmask). @default none */
  onSecure?: ((p: SecureProgress) => void) | undefined;
}

/** Where the records come from. @internal */
export interface RecordSource {
  header: DeltaHeader;
  records(skip: ReadonlySet<string>): AsyncGenerator<DeltaRecord, void, undefined>;
  close(): Promise<void>;
}

function sameRate(a: number, b: number): boolean {
  return Math.abs(a - b) <= 1e-12;
}

/**
 * The method the server's Job requires, read from its enum (or, from an older
 * server, its text).
 * @throws DeltaMismatchError when this client does not know it.
 */
function jobMethod(job: Job): PruneMethod {
  try {
    return pruneMethodFromWire(job.pruneMethod, job.method) ?? DEFAULT_PRUNE_METHOD;
  } catch (err) {
    const asked = job.method === '' ? String(job.pruneMethod) : job.method;
    throw new DeltaMismatchError(
      'method',
      asked,
      '',
      `job ${job.id} requires the method ${JSON.stringify(asked)}, which this client does not know`,
      { cause: err },
    );
  }
}

/** The method a delta's header records ('' when none, or one this client does not know). */
function deltaMethod(header: DeltaHeader): string {
  try {
    return pruneMethodFromWire(header.pruneMethod, header.method) ?? '';
  } catch {
    return header.method === '' ? String(header.pruneMethod) : header.method;
  }
}

/**
 * Why the job needs deltas rather than fine-tuned weights, if it does: a secure job masks and scales its values as
 * deltas; a max_abs_value below the default bounds each value sent, which must then be Δ, not F (docs/server.md).
 */
function deltasRequired(job: Job): string | undefined {
  if (job.privacy === Privacy.PRIVACY_SECURE) return `job ${job.id} is secure (values are masked as deltas)`;
  if (job.maxAbsValue > 0 && job.maxAbsValue < DEFAULT_MAX_ABS_VALUE)
    return `job ${job.id} bounds values by max_abs_value ${job.maxAbsValue}`;
  return undefined;
}

/** The value form to prune to for `job`: deltas when the job needs them, else as asked. @internal */
export function valueKindFor(job: Job, asked: ValueKindChoice | undefined): ValueKindChoice {
  return deltasRequired(job) === undefined ? (asked ?? 'auto') : 'delta';
}

/** Checks a delta's header against the job before anything is sent (or evaluated). @internal */
export function checkHeader(header: DeltaHeader, job: Job, what: string): void {
  if (job.baseFingerprint !== '' && header.baseFingerprint !== job.baseFingerprint) {
    throw new DeltaMismatchError(
      'baseFingerprint',
      job.baseFingerprint,
      header.baseFingerprint,
      `${what} was made against another base than job ${job.id}'s (${job.basePath}): fingerprint ${header.baseFingerprint}, the job's is ${job.baseFingerprint}`,
    );
  }
  if (!sameRate(header.rate, job.rate)) {
    throw new DeltaMismatchError(
      'rate',
      String(job.rate),
      String(header.rate),
      `${what} is pruned at rate ${header.rate}; job ${job.id} requires ${job.rate}`,
    );
  }
  const required = jobMethod(job);
  const method = deltaMethod(header);
  if (method !== required) {
    throw new DeltaMismatchError(
      'method',
      required,
      method,
      `${what} is pruned with ${method}; job ${job.id} requires ${required}`,
    );
  }
  const why = deltasRequired(job);
  if (why !== undefined && header.valueKind === ValueKind.VALUE_KIND_FINETUNED) {
    throw new DeltaMismatchError(
      'valueKind',
      'delta',
      'finetuned',
      `${what} holds fine-tuned weights, but ${why}: prune it again with --value-kind delta`,
    );
  }
}

/** The records of a `.dppa` file, without the tensors in `skip`. */
async function* skipTensors(
  records: AsyncIterable<DeltaRecord>,
  skip: ReadonlySet<string>,
): AsyncGenerator<DeltaRecord, void, undefined> {
  let skipping = false;
  for await (const record of records) {
    if (record.tensorBegin !== undefined) skipping = skip.has(record.tensorBegin.name);
    if (!skipping) yield record;
    if (record.tensorEnd !== undefined) skipping = false;
  }
}

async function fileSource(path: string, job: Job, signal: AbortSignal): Promise<RecordSource> {
  const header = await readDeltaHeader(path, { signal });
  checkHeader(header, job, path);
  return {
    header,
    records: (skip) => skipTensors(readDeltaFile(path, { signal }), skip),
    close: () => Promise.resolve(),
  };
}

/** GetUploadState of the pushing party, within the push's scope (retried). */
export function partyUploadState(
  conn: Connection,
  o: Pick<PushOptions, 'jobId' | 'party'>,
  scope: CallScope,
): Promise<UploadState> {
  return inScope(
    conn,
    'GetUploadState',
    conn.uploads.getUploadState.bind(conn.uploads),
    { jobId: o.jobId, party: o.party },
    scope,
    true,
  );
}

/** The file of `keepDelta`: reused when it fits the job, else pruned anew. @internal */
export async function keptDelta(
  o: PushFromCheckpoints & { keepDelta: string },
  job: Job,
  signal: AbortSignal,
  onProgress: (p: PruneProgress) => void,
): Promise<string> {
  const path = o.keepDelta;
  try {
    checkHeader(await readDeltaHeader(path, { signal }), job, path);
    return path;
  } catch (err) {
    // Missing, damaged or made for another job: pruned anew below (the writer replaces it only once complete).
    if (signal.aborted) throw err;
  }
  await mkdir(dirname(path), { recursive: true });
  await pruneToFile({
    ...o,
    rate: job.rate,
    method: jobMethod(job),
    valueKind: valueKindFor(job, o.valueKind),
    out: path,
    signal,
    onProgress,
  });
  return path;
}

async function openSource(
  o: PushOptions,
  job: Job,
  signal: AbortSignal,
  report: (p: PushProgress) => void,
): Promise<RecordSource> {
  if (o.delta !== undefined) return fileSource(o.delta, job, signal);
  const { rate, method } = o;
  const required = jobMethod(job);
  if (rate !== undefined && !sameRate(rate, job.rate)) {
    throw new DeltaMismatchError(
      'rate',
      String(job.rate),
      String(rate),
      `rate ${rate} was asked for; job ${job.id} requires ${job.rate}`,
    );
  }
  if (method !== undefined && method !== required) {
    throw new DeltaMismatchError(
      'method',
      required,
      method,
      `method ${method} was asked for; job ${job.id} requires ${required}`,
    );
  }
  const prepare = (p: PruneProgress): void =>
    report({
      phase: 'prepare',
      tensor: p.tensor,
      tensorsDone: p.tensorsDone,
      tensorsTotal: p.tensorsTotal,
      bytesSent: 0,
      attempt: 1,
    });
  if (o.keepDelta !== undefined)
    return fileSource(await keptDelta({ ...o, keepDelta: o.keepDelta }, job, signal, prepare), job, signal);
  const session = await openPrune({
    // The pruner takes its own options from these and ignores jobId, party and keepDelta.
    ...o,
    rate: job.rate,
    method: required,
    valueKind: valueKindFor(job, o.valueKind),
    signal,
    onProgress: (p) => {
      if (p.phase === 'significance') prepare(p);
    },
  });
  try {
    checkHeader(session.header, job, `the delta of ${o.finetuned}`);
  } catch (err) {
    await session.close();
    throw err;
  }
  return { header: session.header, records: (skip) => session.records(skip), close: () => session.close() };
}

function ignore(): void {}

/**
 * One client stream (Upload, UploadMasked), written with backpressure: `write()` waits for 'drain'
 * when grpc-js's buffer is full, and stops as soon as the call has ended. @internal
 */
export class UploadStream<Req = UploadRequest, Res = UploadState> {
  readonly result: Promise<Res>;
  private readonly call: ClientWritableStream<Req>;
  private ended = false;
  private wake: (() => void) | undefined;
  private readonly onAbort = (): void => this.call.cancel();

  constructor(
    conn: Connection,
    private readonly signal: AbortSignal,
    open?: (callback: (err: Error | null, res: Res) => void) => ClientWritableStream<Req>,
  ) {
    let resolve!: (s: Res) => void;
    let reject!: (e: unknown) => void;
    this.result = new Promise<Res>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Awaited by finish(); an early failure must not count as unhandled while records are still being written.
    this.result.catch(ignore);
    const opener =
      open ??
      ((cb: (err: Error | null, res: Res) => void) =>
        conn.uploads.upload(
          conn.metadata(),
          {},
          cb as (err: Error | null, res: UploadState) => void,
        ) as unknown as ClientWritableStream<Req>);
    this.call = opener((err, res) => {
      this.ended = true;
      this.wake?.();
      if (err !== null) reject(err);
      else resolve(res);
    });
    this.call.on('drain', () => this.wake?.());
    this.call.on('error', ignore);
    signal.addEventListener('abort', this.onAbort, { once: true });
  }

  /** Sends one message; false once the call has ended (its result says how). */
  async write(message: Req): Promise<boolean> {
    if (this.ended) return false;
    if (!this.call.write(message)) {
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
    return !this.ended;
  }

  /** Half-closes the stream and waits for the server's answer. */
  async finish(): Promise<Res> {
    if (!this.ended) this.call.end();
    return this.result;
  }

  /** Cancels the call (no-op once it has ended) and drops the abort listener. */
  close(): void {
    this.signal.removeEventListener('abort', this.onAbort);
    this.call.cancel();
  }
}

/**
 * Uploads a party's delta (see {@link DppaClient.push}).
 * @throws DeltaMismatchError, JobStateError, UploadIncompleteError, DppaRpcError,
 *   FormatError/CheckpointMismatchError from the delta or checkpoints, the signal's reason.
 */
export async function push(conn: Connection, o: PushOptions, call: PushCallOptions = {}): Promise<UploadState> {
  const scope = new CallScope('Upload', call);
  const report = (p: PushProgress): void => call.onProgress?.(p);
  let source: RecordSource | undefined;
  try {
    const uploadState = (): Promise<UploadState> => partyUploadState(conn, o, scope);
    const job = await inScope(conn, 'GetJob', conn.jobs.getJob.bind(conn.jobs), { jobId: o.jobId }, scope, true);
    if (job.privacy === Privacy.PRIVACY_SECURE) return await pushSecure(conn, o, job, scope, call);
    const state = await uploadState();
    if (state.complete) {
      // Nothing to send, but the caller may evaluate the kept delta next: it must exist.
      if (o.delta === undefined && o.keepDelta !== undefined)
        await keptDelta({ ...o, keepDelta: o.keepDelta }, job, scope.signal, ignore);
      return state;
    }
    if (job.state !== JobState.JOB_STATE_COLLECTING) {
      const why =
        job.state === JobState.JOB_STATE_FAILED
          ? `failed (${job.failureReason})`
          : `${jobStateName(job.state)}, past collecting`;
      throw new JobStateError(
        job.id,
        jobStateName(job.state),
        `job ${job.id} is ${why}: it accepts no more uploads, and holds ${state.tensorsReceived.length} of party "${o.party}"'s tensors`,
      );
    }
    source = await openSource(o, job, scope.signal, report);
    const { header } = source;
    if (state.baseFingerprint !== '' && state.baseFingerprint !== header.baseFingerprint) {
      throw new DeltaMismatchError(
        'baseFingerprint',
        state.baseFingerprint,
        header.baseFingerprint,
        `the server holds part of an upload of party "${o.party}" made against another base (fingerprint ${state.baseFingerprint}) than this delta's (${header.baseFingerprint})`,
      );
    }
    return await uploadRecords(conn, o, scope, source, state, uploadState, report);
  } catch (err) {
    throw scope.reason(err);
  } finally {
    await source?.close();
    scope.dispose();
  }
}

/**
 * Sends a source's records the server does not hold yet, on Upload streams resumed after drops (see {@link push}).
 * @internal
 */
export async function uploadRecords(
  conn: Connection,
  o: { jobId: string; party: string },
  scope: CallScope,
  source: RecordSource,
  initial: UploadState,
  uploadState: () => Promise<UploadState>,
  report: (p: PushProgress) => void,
): Promise<UploadState> {
  let state = initial;
  const { header } = source;
  const tensorsTotal = header.tensors.filter((t) => t.sent).length;
  const backoff = conn.backoff();
  let bytesSent = 0;
  for (let attempt = 1; ; attempt++) {
    if (attempt > 1) {
      const before = state.tensorsReceived.length;
      state = await uploadState();
      if (state.complete) return state;
      // Count only failures in a row that made no progress: a long upload may be interrupted many times.
      if (state.tensorsReceived.length > before) backoff.reset();
    }
    const held = new Set(state.tensorsReceived);
    let tensorsDone = held.size;
    let tensor = '';
    report({ phase: 'upload', tensor, tensorsDone, tensorsTotal, bytesSent, attempt });
    const stream = new UploadStream(conn, scope.signal);
    try {
      // A false write means the call has ended: finish() then says how.
      if (await stream.write({ open: { jobId: o.jobId, party: o.party } })) {
        for await (const record of source.records(held)) {
          if (!(await stream.write({ record }))) break;
          if (record.chunk !== undefined) bytesSent += record.chunk.positions.length + record.chunk.values.length;
          if (record.tensorEnd !== undefined) {
            tensor = record.tensorEnd.name;
            tensorsDone++;
            report({ phase: 'upload', tensor, tensorsDone, tensorsTotal, bytesSent, attempt });
          }
        }
      }
      const result = await stream.finish();
      if (result.complete) return result;
      // Every record went through and the server answered OK: ask once more before calling it incomplete.
      const again = await uploadState();
      if (again.complete) return again;
      throw new UploadIncompleteError(again);
    } catch (err) {
      const e = DppaRpcError.from(scope.reason(err), 'Upload');
      // ALREADY_EXISTS: a server without slot takeover still holds the slot of an earlier stream of ours.
      if (scope.signal.aborted || !(isTransient(e) || (e instanceof DppaRpcError && e.code === Status.ALREADY_EXISTS)))
        throw e;
      await backoff.failed(e, scope.signal);
    } finally {
      stream.close();
    }
  }
}
