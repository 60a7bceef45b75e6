/**
 * The merge with `--cluster`: split into tasks on the replicas' work queue
 * (task-queue.ts), so that every replica merges tensors of the same job.
 *
 * 1. `plan` (one per job; any replica may queue it, JetStream drops repeats):
 *    creates the job's merge record in the KV bucket (`merge.<jobId>`: the
 *    number of tensors and a bitmap of those written), lays the output out in
 *    the shared data folder (`merged.cluster-tmp`: every weight file with its
 *    header and size, the shard index, the extra files), then queues one
 *    `tensor` task per tensor not yet written, each with its own `Nats-Msg-Id`
 *    (a plan that runs again after failing midway queues the rest; repeats
 *    within the duplicate window are dropped, later ones find their bit set).
 * 2. `tensor`: merges one tensor (`mergeTensor`, on this replica's merge
 *    threads; tensors no party sent are copied), writes it at its offset and
 *    flushes it to disk, then sets its bit in the record (an update against
 *    the revision read). The task is acknowledged after that, so a replica
 *    killed on the way leaves the task to another one, which writes the same
 *    bytes again. Whoever sets the last bit queues the `commit`, and so does
 *    a tensor task that runs again and finds every bit set (the first may
 *    have failed to queue it).
 * 3. `commit`: renames the output into place (`merged/`), records each file's
 *    SHA-256 and moves the job MERGING → MERGED. That move is checked against
 *    the job's revision, so however often the commit runs, the job merges
 *    once and `merged` is published at most once by the commit that moved
 *    it. If that commit fails between the move and the publish (NATS away,
 *    replica killed), the commit task runs again, finds the job MERGED and
 *    the stream without its `merged` event, and publishes it then.
 *
 * A tensor task that finds a party's spooled tensor unusable sends that party
 * back to collecting (jobs/party-stops.ts), as the embedded merge does; the
 * merge record and the tensors written stay, and the merge goes on from them
 * once the party has sent the tensor again.
 *
 * The merged bytes are those of the embedded merge: the same per-tensor
 * merge, the same layout, the same extra files.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { KV } from '@nats-io/kv';
import { FormatError } from '../../proto/errors.js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { Checkpoint, SharedCheckpointWriter } from '../../proto/safetensors/index.js';
import { UnavailableError } from '../errors.js';
import type { JobEvents } from '../jobs/job-events.js';
import { mergeParties, PROGRESS_INTERVAL_MS, type DistributedStep } from '../jobs/job-runner.js';
import { isTerminal, stateName, type JobStore, type StoredJob } from '../jobs/job-store.js';
import { failJob, StateConflictError, transitionJob } from '../jobs/job-transitions.js';
import { sendPartyBack } from '../jobs/party-stops.js';
import type { Logger } from '../log.js';
import { contributionsTo, describeFiles, type MergeParty } from '../merge/merger.js';
import { inlineRunner, workerRunner, type MergeRunner } from '../merge/merge-runner.js';
import { SpooledTensorError } from '../merge/tensor-merge.js';
import type { Metrics } from '../metrics.js';
import { mergeKey } from '../nats/subjects.js';
import type { Spool } from '../uploads/spool.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';
import { TaskNotReadyError, type Task, type TaskQueue } from './task-queue.js';

/** Folder of a job's merge output while replicas write it, next to `merged/`. */
const WORK_DIR = 'merged.cluster-tmp';

/** How often a replica closes what it holds open for jobs that are no longer merging (their merge threads and buffers). */
const RELEASE_INTERVAL_MS = 5000;

/**
 * A job that ended less than this long ago may still be publishing its final
 * event: a commit task that finds the event missing waits this long before
 * publishing it itself.
 */
const FINAL_EVENT_GRACE_MS = 3000;

/** What `merge.<jobId>` holds. */
interface MergeRecord {
  tensorsTotal: number;
  /** Bitmap of the tensors written (bit i: tensor i of the base), base64. */
  written: string;
  /** RFC 3339: when the plan ran first, for the merge's duration. */
  startedAt: string;
}

/** A job being merged on this replica: its base, merge threads and output. */
interface JobContext {
  base: Checkpoint;
  runner: MergeRunner;
  writer: SharedCheckpointWriter;
  parties: MergeParty[];
  outsideByMax: boolean;
}

/** Options of {@link MergeTasks}. */
export interface MergeTasksOptions {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  /** The jobs bucket, holding each job's merge record. */
  kv: KV;
  /** Where tasks are queued; set before any task runs (the queue's handler is {@link MergeTasks.handle}). */
  queue: () => TaskQueue;
  metrics: Metrics;
  log: Logger;
  /** Merge threads of this replica (0: this thread). */
  mergeWorkers: number;
}

/** The merge's tasks: asking for a merge, and carrying out plan, tensor and commit tasks. */
export class MergeTasks implements DistributedStep {
  private readonly contexts = new Map<string, Promise<JobContext>>();
  private closed = false;
  private readonly lastProgress = new Map<string, number>();
  /** Another replica may have committed the job: this one learns it from the store, not from a task. */
  private readonly releaser = setInterval(() => void this.releaseFinished(), RELEASE_INTERVAL_MS).unref();

  constructor(private readonly opts: MergeTasksOptions) {}

  /** Tasks of one replica that can run at once: one per merge thread, and one more that reads and writes. */
  static lanes(mergeWorkers: number): number {
    return Math.max(1, mergeWorkers) + 1;
  }

  /** Queues the job's plan task (repeats within the queue's duplicate window are dropped). */
  async request(jobId: string): Promise<void> {
    await this.opts.queue().publish({ kind: 'plan', jobId }, `${jobId}.plan`);
  }

  /**
   * Carries out one task. Tasks of jobs that have ended are dropped (a commit
   * task first publishes the job's final event if the stream lacks it); a
   * task of a job this replica's copy shows as not yet merging is checked
   * against the bucket and handed back if the bucket agrees.
   */
  async handle(task: Task, signal: AbortSignal): Promise<void> {
    let job = this.opts.store.get(task.jobId);
    if (!isTerminal(job.state) && job.state !== JobState.JOB_STATE_MERGING) job = (await this.opts.store.fresh?.(task.jobId)) ?? job;
    if (isTerminal(job.state)) {
      await this.release(task.jobId);
      if (task.kind !== 'commit') return;
      // The replica that committed may have died before deleting the uploads or announcing the end.
      if (job.state === JobState.JOB_STATE_MERGED) await this.opts.spool.discardJob(job.id);
      await this.announceEnd(job);
      return;
    }
    if (job.state !== JobState.JOB_STATE_MERGING) {
      // Sent back to collecting (a party's data was unusable): its next merge reads the spools again.
      await this.release(task.jobId);
      // Tasks are queued once the job is MERGING: the bucket will say so.
      throw new TaskNotReadyError(`job ${job.id} is ${stateName(job.state)} here, not yet MERGING`);
    }
    try {
      if (task.kind === 'plan') await this.plan(job);
      else if (task.kind === 'tensor') await this.tensor(job, task.tensor!, signal);
      else await this.commit(job);
    } catch (err) {
      if (!(err instanceof FormatError) || signal.aborted) throw err;
      if (err instanceof SpooledTensorError) {
        // One party's data: that party sends it again; the tensors written so far stay written (their inputs do not change).
        await this.release(job.id);
        await sendPartyBack(this.opts, job.id, JobState.JOB_STATE_MERGING, err);
        // Handed back, not done: it runs again once the job is merging again (a new task would be dropped as a repeat).
        throw new TaskNotReadyError(`job ${job.id} went back to collecting: ${err.message}`);
      }
      // Damaged or mismatched input: every replica would fail alike, so the job fails (once) and the task is done.
      this.opts.log.error('merge failed', { jobId: job.id, err });
      await failJob(this.opts, job.id, `merge failed: ${err.message}`).catch((e: unknown) => {
        if (!(e instanceof StateConflictError)) throw e;
      });
      await this.release(job.id);
    }
  }

  /**
   * Publishes the final event of an ended job if the stream lacks it: the
   * replica that moved the job died or lost NATS between the move and the
   * publish. A job that ended moments ago is given time to publish it first.
   */
  private async announceEnd(job: StoredJob): Promise<void> {
    const { events, log } = this.opts;
    if (events.hasFinalEvent === undefined || (await events.hasFinalEvent(job.id))) return;
    if (Date.now() - Date.parse(job.updatedAt) < FINAL_EVENT_GRACE_MS) {
      throw new TaskNotReadyError(`job ${job.id} ended moments ago; its final event may still be on its way`, FINAL_EVENT_GRACE_MS);
    }
    if (job.state === JobState.JOB_STATE_MERGED && job.merged !== undefined) {
      await events.append(job.id, { merged: { files: job.merged.files.map((f) => f.path), seconds: job.merged.seconds, patch: job.merged.patch?.path ?? '' } });
    } else if (job.state === JobState.JOB_STATE_FAILED) {
      await events.append(job.id, { failed: { reason: job.failureReason } });
    } else {
      return;
    }
    log.warn('published the final event a replica had left out', { jobId: job.id, state: stateName(job.state) });
  }

  private outDir(jobId: string): string {
    return join(this.opts.store.dir(jobId), 'merged');
  }

  private workDir(jobId: string): string {
    return join(this.opts.store.dir(jobId), WORK_DIR);
  }

  private async plan(job: StoredJob): Promise<void> {
    const base = await Checkpoint.open(job.basePath);
    let tensors: string[];
    try {
      tensors = base.tensors().map((t) => t.name);
      const isDir = (await stat(job.basePath)).isDirectory();
      const record = await this.record(job.id, tensors.length);
      if (countWritten(record) === record.tensorsTotal) {
        await this.queueCommit(job.id);
        return;
      }
      await SharedCheckpointWriter.layOut(this.workDir(job.id), this.outDir(job.id), base.layout, isDir ? { copyExtraFilesFrom: job.basePath } : {});
      // Every unwritten tensor, even if some are still queued: a plan that failed midway left others unqueued.
      // Each has its own msgId, so JetStream drops those queued within its duplicate window.
      const written = bitmap(record);
      for (const [index, name] of tensors.entries()) {
        if (!isSet(written, index)) await this.opts.queue().publish({ kind: 'tensor', jobId: job.id, tensor: { name, index } }, `${job.id}.tensor.${index}`);
      }
    } finally {
      await base.close();
    }
  }

  private async tensor(job: StoredJob, tensor: { name: string; index: number }, signal: AbortSignal): Promise<void> {
    const record = await this.record(job.id);
    if (isSet(bitmap(record), tensor.index)) {
      // Run again: the first run may have set the last bit and failed to queue the commit (dropped if queued).
      if (countWritten(record) === record.tensorsTotal) await this.queueCommit(job.id);
      return;
    }
    const ctx = await this.context(job);
    const info = ctx.base.info(tensor.name);
    const contributions = contributionsTo(tensor.name, ctx.parties);
    const result = contributions.length === 0
      ? { bytes: await ctx.base.readRaw(tensor.name, { signal }), release: () => undefined }
      : await ctx.runner.run({ name: tensor.name, contributions, outsideByMax: ctx.outsideByMax }, info.numel, signal);
    try {
      signal.throwIfAborted();
      await ctx.writer.writeTensor(tensor.name, result.bytes);
    } finally {
      result.release();
    }
    this.opts.metrics.mergeTensors.inc();
    this.opts.metrics.mergeBytes.inc(info.byteLength);
    const written = await this.markWritten(job.id, tensor.index);
    const total = record.tensorsTotal;
    const now = performance.now();
    if (written === total || now - (this.lastProgress.get(job.id) ?? 0) >= PROGRESS_INTERVAL_MS) {
      this.lastProgress.set(job.id, now);
      await this.opts.events.append(job.id, { mergeProgress: { tensorsDone: written, tensorsTotal: total } });
    }
    if (written === total) await this.queueCommit(job.id);
  }

  private async commit(job: StoredJob): Promise<void> {
    const record = await this.record(job.id);
    if (countWritten(record) !== record.tensorsTotal) return;
    await this.release(job.id);
    await SharedCheckpointWriter.commit(this.workDir(job.id), this.outDir(job.id));
    const files = await describeFiles(this.outDir(job.id));
    const seconds = (Date.now() - Date.parse(record.startedAt)) / 1000;
    try {
      await transitionJob(this.opts, job.id, JobState.JOB_STATE_MERGED, {
        from: JobState.JOB_STATE_MERGING,
        change: (j) => (j.merged = { files, seconds }),
      });
    } catch (err) {
      // Another replica committed first.
      if (err instanceof StateConflictError) return;
      throw err;
    }
    this.opts.metrics.mergeDuration.observe(seconds);
    await this.opts.spool.discardJob(job.id);
    await this.opts.events.append(job.id, { merged: { files: files.map((f) => f.path), seconds, patch: '' } });
    this.opts.log.info('job merged', { jobId: job.id, seconds, tensors: record.tensorsTotal });
  }

  private queueCommit(jobId: string): Promise<void> {
    return this.opts.queue().publish({ kind: 'commit', jobId }, `${jobId}.commit`);
  }

  /** The job's merge record; created (nothing written yet) when `tensorsTotal` is given and there is none. */
  private async record(jobId: string, tensorsTotal?: number): Promise<MergeRecord> {
    const { kv } = this.opts;
    const key = mergeKey(jobId);
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading a merge record', () => kv.get(key));
      if (entry?.operation === 'PUT') return entry.json<MergeRecord>();
      if (tensorsTotal === undefined) throw new Error(`job ${jobId} has no merge record: its plan has not run`);
      const record: MergeRecord = { tensorsTotal, written: Buffer.alloc(Math.ceil(tensorsTotal / 8)).toString('base64'), startedAt: new Date().toISOString() };
      try {
        await natsCall('creating a merge record', () => kv.create(key, JSON.stringify(record)));
        return record;
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** Sets a tensor's bit in the job's record. @returns How many tensors are written now. */
  private async markWritten(jobId: string, index: number): Promise<number> {
    const { kv } = this.opts;
    const key = mergeKey(jobId);
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading a merge record', () => kv.get(key));
      if (entry?.operation !== 'PUT') throw new Error(`job ${jobId} has no merge record`);
      const record = entry.json<MergeRecord>();
      const written = bitmap(record);
      if (isSet(written, index)) return countWritten(record);
      written[index >> 3]! |= 1 << (index & 7);
      record.written = Buffer.from(written).toString('base64');
      try {
        await natsCall('updating a merge record', () => kv.update(key, JSON.stringify(record), entry.revision));
        return countWritten(record);
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** Opens (once) what this replica needs to merge the job's tensors. */
  private context(job: StoredJob): Promise<JobContext> {
    // After close() nothing may open merge threads again: they would keep the process alive.
    if (this.closed) return Promise.reject(new UnavailableError('the replica is stopping'));
    let ctx = this.contexts.get(job.id);
    if (ctx === undefined) {
      ctx = this.openContext(job);
      this.contexts.set(job.id, ctx);
      void ctx.catch(() => this.contexts.delete(job.id));
    }
    return ctx;
  }

  private async openContext(job: StoredJob): Promise<JobContext> {
    // Uploads landed on every replica: read the spools again (they no longer change once the job merges).
    await this.opts.spool.refreshJob(job.id);
    const parties = mergeParties(job, this.opts.spool);
    const base = await Checkpoint.open(job.basePath);
    try {
      const writer = await SharedCheckpointWriter.open(this.workDir(job.id), this.outDir(job.id), base.layout);
      const { mergeWorkers } = this.opts;
      const runner = mergeWorkers === 0 ? inlineRunner(base) : workerRunner(job.basePath, mergeWorkers);
      return { base, runner, writer, parties, outsideByMax: job.dpa.scaleOutsideByMax };
    } catch (err) {
      await base.close();
      throw err;
    }
  }

  /** Closes what this replica holds open for a job. */
  private async release(jobId: string): Promise<void> {
    const ctx = this.contexts.get(jobId);
    this.contexts.delete(jobId);
    this.lastProgress.delete(jobId);
    if (ctx === undefined) return;
    const c = await ctx.catch(() => undefined);
    if (c === undefined) return;
    await c.runner.close();
    await c.writer.close();
    await c.base.close();
  }

  private async releaseFinished(): Promise<void> {
    for (const id of [...this.contexts.keys()]) {
      const state = this.opts.store.list().find((j) => j.id === id)?.state;
      if (state !== JobState.JOB_STATE_MERGING) await this.release(id).catch((err: unknown) => this.opts.log.warn('cannot close a merge', { jobId: id, err }));
    }
  }

  /** Closes everything held for every job (after the queue stopped). */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.releaser);
    await Promise.all([...this.contexts.keys()].map((id) => this.release(id)));
  }
}

function bitmap(record: MergeRecord): Uint8Array {
  return new Uint8Array(Buffer.from(record.written, 'base64'));
}

function isSet(bits: Uint8Array, index: number): boolean {
  return ((bits[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

function countWritten(record: MergeRecord): number {
  let n = 0;
  for (const byte of bitmap(record)) for (let b = byte; b !== 0; b &= b - 1) n++;
  return n;
}
