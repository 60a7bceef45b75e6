/**
 * Receiving one upload stream (UploadOpen, DeltaHeader, then each tensor's records), checked record by record and
 * written straight to the party's spool; one stream per party, a newer one takes over. See docs/design/uploads.md.
 */
import type { DeltaFileWriter } from '../../proto/sparse/index.js';
import { TensorAssembler } from '../../proto/sparse/index.js';
import { DeltaHeader, type DeltaRecord, type TensorPlan } from '../../proto/gen/dppa/v1/sparse.js';
import type { UploadRequest, UploadState } from '../../proto/gen/dppa/v1/upload.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import {
  AbortedError,
  BaseReadError,
  FailedPreconditionError,
  InvalidArgumentError,
  ResourceExhaustedError,
} from '../errors.js';
import type { JobEvents } from '../jobs/job-events.js';
import type { JobRunner } from '../jobs/job-runner.js';
import type { JobStore, StoredJob } from '../jobs/job-store.js';
import type { Metrics } from '../metrics.js';
import type { Authenticator } from '../rpc/auth.js';
import type { CallContext } from '../rpc/handler.js';
import { checkDeltaHeader, requireCollecting, sameShape } from './delta-header-check.js';
import { receivedEncoding, undecodable } from './received-record.js';
import type { PartySpool, Spool, UploadSlot } from './spool.js';
import { ContentRules, type TensorCheck } from './tensor-check.js';

/** Shortest interval between two upload_progress events of a party (the one completing the upload is always sent). */
const PROGRESS_INTERVAL_MS = 250;

/**
 * Tensor files being closed at once while the stream goes on. Each close is
 * an fsync and a rename (about 12 ms for a few MB on the reference machine),
 * during which a stream that waited would not be read.
 */
const MAX_CLOSING = 4;

/** What an upload needs from the server. */
export interface UploadDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  runner: JobRunner;
  metrics: Metrics;
  auth: Authenticator;
}

/** The state of a party's upload, as UploadService returns it. */
export function uploadState(jobId: string, party: string, spool: PartySpool): UploadState {
  return {
    jobId,
    party,
    tensorsReceived: [...spool.held.keys()],
    tensorsExpected: spool.expected,
    bytesReceived: BigInt(spool.heldBytes),
    complete: spool.complete,
    baseFingerprint: spool.header?.baseFingerprint ?? '',
  };
}

/**
 * Receives one upload stream.
 * @returns The party's upload state after the stream.
 * @throws InvalidArgumentError, FailedPreconditionError, ResourceExhaustedError, PermissionDeniedError,
 *   UnauthenticatedError, FormatError, ChecksumError as the records dictate; AbortedError when a newer
 *   stream of the party took over; the call's signal's reason when it aborts.
 */
export async function receiveUpload(
  deps: UploadDeps,
  requests: AsyncIterable<UploadRequest>,
  ctx: CallContext,
): Promise<UploadState> {
  const takenOver = new AbortController();
  let session: UploadSession | undefined;
  try {
    for await (const req of untilAborted(requests, AbortSignal.any([ctx.signal, takenOver.signal]))) {
      const bad = undecodable(req);
      if (bad !== undefined)
        throw new InvalidArgumentError(
          `upload message ${session === undefined ? 1 : 'after the UploadOpen'} does not decode: ${bad.message}`,
          { cause: bad },
        );
      if (session === undefined) session = await UploadSession.open(deps, req, ctx, takenOver);
      else await session.take(req);
    }
    if (session === undefined) throw new InvalidArgumentError('empty upload stream: send an UploadOpen first');
    return await session.finish();
  } finally {
    await session?.close();
  }
}

function ignore(): void {}

/**
 * The items of `source` until `signal` aborts, which throws its reason even
 * while waiting for the next item (a client that froze sends nothing more).
 */
async function* untilAborted<T>(source: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T, void, undefined> {
  const it = source[Symbol.asyncIterator]();
  let onAbort = ignore;
  const aborted = new Promise<never>((_, reject) => {
    // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
    onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  aborted.catch(ignore);
  try {
    for (;;) {
      signal.throwIfAborted();
      const next = it.next();
      // Left pending when the signal wins: it settles as the call ends, and must not count as unhandled.
      next.catch(ignore);
      const r = await Promise.race([next, aborted]);
      if (r.done === true) return;
      yield r.value;
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

/** The tensor whose records are arriving. */
interface OpenTensor {
  name: string;
  index: number;
  assembler: TensorAssembler;
  check: TensorCheck;
  /** Undefined when the tensor is already held: its records are checked and dropped. */
  writer: DeltaFileWriter | undefined;
  /** Chunk payload bytes spooled so far. */
  payload: number;
}

class UploadSession {
  private header: DeltaHeader | undefined;
  private rules: ContentRules | undefined;
  /** The job's base, open while the session checks fine-tuned weights against it. */
  private base: Checkpoint | undefined;
  private tensor: OpenTensor | undefined;
  private lastProgress = 0;
  /** Completed tensors whose spool file is being closed, by name. */
  private readonly closing = new Map<string, Promise<void>>();
  /** The first failure of closing a tensor's file; the stream fails with it. */
  private closeFailure: { err: unknown } | undefined;
  private completeSent = false;
  private release = ignore;

  private constructor(
    private readonly deps: UploadDeps,
    private readonly job: StoredJob,
    private readonly party: string,
    private readonly spool: PartySpool,
  ) {}

  /**
   * Opens the session of the party named by `req`, taking its upload slot
   * over from a stream that holds it (`takenOver` ends this one in turn).
   */
  static async open(
    deps: UploadDeps,
    req: UploadRequest,
    ctx: CallContext,
    takenOver: AbortController,
  ): Promise<UploadSession> {
    if (req.open === undefined) throw new InvalidArgumentError('the first message of an upload must be an UploadOpen');
    const { jobId, party } = req.open;
    deps.auth.requireParty(ctx.metadata, jobId, party);
    requireCollecting(deps.store.get(jobId));
    const spool = deps.spool.party(jobId, party);
    for (;;) {
      // Several newer streams at once: each waits for the one it ended, and the last to come keeps the slot.
      while (spool.upload !== undefined) {
        const held = spool.upload;
        held.takeOver();
        await held.released;
        ctx.signal.throwIfAborted();
      }
      // The party's upload may have gone on on another server sharing the data folder.
      await deps.spool.ofParty(jobId, party);
      if (spool.upload === undefined) break;
    }
    // The job may have moved on while the old stream closed its tensors.
    const job = deps.store.get(jobId);
    requireCollecting(job);
    const session = new UploadSession(deps, job, party, spool);
    const slot: UploadSlot = {
      takeOver: () =>
        takenOver.abort(
          new AbortedError(`a newer upload stream of party ${party} to job ${jobId} took over from this one`),
        ),
      released: new Promise<void>((resolve) => (session.release = resolve)),
    };
    spool.upload = slot;
    deps.metrics.uploadsActive.inc();
    const stored = job.parties.find((p) => p.name === party)!;
    if (!stored.joined) {
      try {
        await deps.store.update(jobId, (j) => (j.parties.find((p) => p.name === party)!.joined = true));
        await deps.events.append(jobId, { partyJoined: { party } });
      } catch (err) {
        await session.close();
        throw err;
      }
    }
    return session;
  }

  async take(req: UploadRequest): Promise<void> {
    if (this.closeFailure !== undefined) throw this.closeFailure.err;
    if (req.open !== undefined) throw new InvalidArgumentError('UploadOpen must be the first message only');
    const record = req.record;
    if (record === undefined)
      throw new InvalidArgumentError('an upload message must carry an UploadOpen or a DeltaRecord');
    const set = [record.header, record.tensorBegin, record.chunk, record.tensorEnd].filter(
      (f) => f !== undefined,
    ).length;
    if (set !== 1)
      throw new InvalidArgumentError(
        `a DeltaRecord must have exactly one of header/tensor_begin/chunk/tensor_end set, got ${set}`,
      );
    if (record.header !== undefined) {
      if (this.header !== undefined) throw new InvalidArgumentError('a second DeltaHeader in one upload stream');
      await this.acceptHeader(record.header);
      return;
    }
    if (this.header === undefined) throw new InvalidArgumentError('the delta records must start with a DeltaHeader');
    if (record.tensorBegin !== undefined) {
      if (this.tensor !== undefined) {
        throw new InvalidArgumentError(
          `tensor "${record.tensorBegin.name}" begins before tensor "${this.tensor.name}" ended`,
        );
      }
      this.tensor = await this.begin(record);
      return;
    }
    const t = this.tensor;
    if (t === undefined)
      throw new InvalidArgumentError(`a ${record.chunk !== undefined ? 'chunk' : 'tensor end'} outside a tensor`);
    if (record.chunk !== undefined) await this.chunk(t, record);
    else await this.end(t, record);
  }

  private async acceptHeader(header: DeltaHeader): Promise<void> {
    const job = this.current();
    let shapes: Map<string, readonly number[]>;
    try {
      // Fine-tuned weights are bounded as deltas F − B: the base is read where their chunks fall.
      if (ContentRules.needsBase(header)) this.base ??= await Checkpoint.open(job.basePath);
      shapes = this.base !== undefined ? shapesOf(this.base) : await baseShapes(job.basePath);
    } catch (err) {
      // The job's base, checked when the job was created, is no longer readable: the server's fault.
      throw BaseReadError.of(undefined, err);
    }
    checkDeltaHeader(job, this.party, header, shapes);
    const stored = this.spool.header;
    const fresh = stored === undefined || canonical(stored) !== canonical(header);
    if (fresh) {
      // A different header is a different delta: only acceptable while nothing of the first one is held.
      if (this.spool.held.size > 0) {
        throw new FailedPreconditionError(
          `the header differs from the one party ${this.party}'s upload started with (${this.spool.held.size} tensor(s) already held): resume with the same delta`,
        );
      }
      await this.spool.saveHeader(header);
    }
    this.header = header;
    this.rules = new ContentRules(header, job.maxAbsValue, this.base, `${job.basePath}\0${job.baseFingerprint}`);
    await this.progress(true);
    // A delta that plans no tensor as sent is complete with its header alone.
    if (fresh && this.spool.complete) await this.completed();
  }

  private async begin(record: DeltaRecord): Promise<OpenTensor> {
    const { name, shape } = record.tensorBegin!;
    this.current();
    const index = this.spool.planIndex(name);
    if (index === undefined)
      throw new InvalidArgumentError(`tensor "${name}" is not planned as sent in the delta's header`);
    const plan: TensorPlan = this.header!.tensors[index]!;
    if (!sameShape(shape, plan.shape.map(Number))) {
      throw new InvalidArgumentError(
        `tensor "${name}": shape [${shape.join(', ')}] in its begin record, the base has [${plan.shape.join(', ')}]`,
      );
    }
    // Values are checked on their stored bits (tensor-check.ts): widening them would be wasted.
    const assembler = new TensorAssembler({
      entries: 'stream',
      maxPartition: this.header!.levels.length,
      values: false,
    });
    assembler.push(record);
    const check = this.rules!.tensor(plan);
    if (this.spool.held.has(name) || this.closing.has(name))
      return { name, index, assembler, check, writer: undefined, payload: 0 };
    const writer = await this.spool.startTensor(plan, index);
    // Open before the first write, so that close() discards the file if that write fails.
    this.tensor = { name, index, assembler, check, writer, payload: 0 };
    await writer.write(record);
    return this.tensor;
  }

  private async chunk(t: OpenTensor, record: DeltaRecord): Promise<void> {
    await t.check.chunk(record.chunk!, t.assembler.push(record)!);
    const payload = record.chunk!.positions.length + record.chunk!.values.length;
    this.deps.metrics.uploadBytes.inc(payload);
    if (t.writer === undefined) return;
    t.payload += payload;
    this.spool.pendingBytes += payload;
    const limit = this.job.maxUploadBytes;
    if (this.spool.heldBytes + this.spool.pendingBytes > limit) {
      throw new ResourceExhaustedError(
        `party ${this.party}'s upload to job ${this.job.id} would exceed its limit of ${limit} bytes (at tensor "${t.name}")`,
      );
    }
    await t.writer.write(record, receivedEncoding(record));
  }

  private async end(t: OpenTensor, record: DeltaRecord): Promise<void> {
    t.assembler.push(record);
    t.check.end(record.tensorEnd!);
    this.tensor = undefined;
    const writer = t.writer;
    if (writer === undefined) return;
    try {
      requireCollecting(this.current());
      await writer.write(record);
    } catch (err) {
      this.spool.pendingBytes -= t.payload;
      await writer.abort();
      throw err;
    }
    while (this.closing.size >= MAX_CLOSING) await Promise.race(this.closing.values());
    this.closing.set(
      t.name,
      this.closeTensor(t, writer).finally(() => this.closing.delete(t.name)),
    );
  }

  /** Closes a completed tensor's spool file in the background; never rejects (a failure is kept for the stream). */
  private async closeTensor(t: OpenTensor, writer: DeltaFileWriter): Promise<void> {
    try {
      try {
        await this.spool.commit(t.name, t.index, writer);
      } finally {
        this.spool.pendingBytes -= t.payload;
      }
      this.deps.metrics.uploadTensors.inc();
      await this.progress(this.spool.complete);
      if (this.spool.complete) await this.completed();
    } catch (err) {
      this.closeFailure ??= { err };
      await writer.abort();
    }
  }

  /** Waits until every tensor file being closed is closed. */
  private async closed(): Promise<void> {
    while (this.closing.size > 0) await Promise.all(this.closing.values());
  }

  private async progress(force: boolean): Promise<void> {
    const now = performance.now();
    if (!force && now - this.lastProgress < PROGRESS_INTERVAL_MS) return;
    this.lastProgress = now;
    const s = this.spool;
    await this.deps.events.append(this.job.id, {
      uploadProgress: {
        party: this.party,
        tensorsReceived: s.held.size,
        tensorsExpected: s.expected,
        bytesReceived: BigInt(s.heldBytes),
      },
    });
  }

  /** Announces the upload complete, once (the last two tensor files may close at the same moment). */
  private async completed(): Promise<void> {
    if (this.completeSent) return;
    this.completeSent = true;
    await this.deps.events.append(this.job.id, { uploadComplete: { party: this.party } });
    this.deps.runner.poke(this.job.id);
  }

  /** The job as it is now, which must still be collecting (it may have been cancelled or moved on during the stream). */
  private current(): StoredJob {
    const job = this.deps.store.get(this.job.id);
    requireCollecting(job);
    return job;
  }

  async finish(): Promise<UploadState> {
    if (this.tensor !== undefined)
      throw new InvalidArgumentError(`the stream ended inside tensor "${this.tensor.name}" (no tensor end)`);
    await this.closed();
    if (this.closeFailure !== undefined) throw this.closeFailure.err;
    return uploadState(this.job.id, this.party, this.spool);
  }

  /** Discards a tensor left open (error, cancellation, stream cut) and releases the party's upload slot. */
  async close(): Promise<void> {
    try {
      const t = this.tensor;
      this.tensor = undefined;
      if (t?.writer !== undefined) {
        this.spool.pendingBytes -= t.payload;
        await t.writer.abort();
      }
      await this.closed();
      this.spool.upload = undefined;
      this.deps.metrics.uploadsActive.dec();
      this.release();
    } finally {
      const base = this.base;
      this.base = undefined;
      await base?.close();
    }
  }
}

/** Shapes of every tensor of a checkpoint (only its headers are read). */
async function baseShapes(basePath: string): Promise<Map<string, readonly number[]>> {
  const base = await Checkpoint.open(basePath);
  try {
    return shapesOf(base);
  } finally {
    await base.close();
  }
}

function shapesOf(base: Checkpoint): Map<string, readonly number[]> {
  return new Map(base.tensors().map((t) => [t.name, t.shape]));
}

/** A header as canonical JSON (object keys sorted), for comparing a resumed upload's header with the stored one. */
function canonical(header: DeltaHeader): string {
  const sortKeys = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sortKeys);
    if (v !== null && typeof v === 'object') {
      return Object.fromEntries(
        Object.entries(v as Record<string, unknown>)
          .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
          .map(([k, x]) => [k, sortKeys(x)]),
      );
    }
    return v;
  };
  return JSON.stringify(sortKeys(DeltaHeader.toJSON(header)));
}
