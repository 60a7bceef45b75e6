/**
 * The merge of a job as three kinds of task, run in process (backend/local.ts)
 * or on the replicas' work queue (backend/jetstream.ts): `plan` lays the
 * output out and submits a `tensor` task per tensor not yet written; each
 * writes its tensor at its offset and sets its bit in the merge record; the
 * one that sets the last bit submits the `commit`, which renames the output
 * into place and moves the job to MERGED. The merged patch (`merge.output`
 * patch or both) is written alongside: each tensor task writes its tensor's
 * records as a piece, the commit joins them (patch-output.ts). docs/design/job-flow.md.
 */
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { FormatError } from '../../proto/errors.js';
import { checkPatchNumel } from '../../proto/patch/index.js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { Checkpoint, SharedCheckpointWriter } from '../../proto/safetensors/index.js';
import {
  countWritten,
  DEFAULT_WORK_DIR,
  isSet,
  bitmap,
  TaskNotReadyError,
  type MergeRecord,
  type MergeRecords,
  type Task,
  type TaskSink,
} from '../backend/tasks.js';
import { UnavailableError } from '../errors.js';
import type { JobEvents } from '../jobs/job-events.js';
import type { JobStep } from '../jobs/job-step.js';
import { isTerminal, stateName, type JobStore, type MergedFileInfo, type StoredJob } from '../jobs/job-store.js';
import { StateConflictError, transitionJob } from '../jobs/job-transitions.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import type { Spool } from '../uploads/spool.js';
import { contributionsTo, mergeParties, type MergeParty } from './merge-parties.js';
import { inlineRunner, workerRunner, type MergeRunner } from './merge-runner.js';
import { describeFiles } from './output-files.js';
import { WrittenFilesHash } from './written-hash.js';
import { SpooledTensorError } from './tensor-merge.js';
import {
  commitPatch,
  createPieces,
  joinedDir,
  mergeOutputs,
  mergeSpaceBytes,
  mergeSpaceLeft,
  patchPath,
  piecesDir,
} from './patch-output.js';

/** Shortest interval between two merge_progress events (the last one is always sent). */
export const PROGRESS_INTERVAL_MS = 250;

/** How often what is held open for jobs no longer merging is closed (their merge threads and buffers). */
const RELEASE_INTERVAL_MS = 5000;

/**
 * A job that ended less than this long ago may still be publishing its final
 * event: a commit task that finds the event missing waits this long before
 * publishing it itself.
 */
const FINAL_EVENT_GRACE_MS = 3000;

/** A job being merged here: its base, merge threads and output. */
interface JobContext {
  base: Checkpoint;
  runner: MergeRunner;
  /** The dense output; none when only the patch is asked for. */
  writer: SharedCheckpointWriter | undefined;
  /** The folder of the patch pieces, when the patch is asked for. */
  pieces: string | undefined;
  parties: MergeParty[];
  outsideByMax: boolean;
}

/** Options of {@link MergeDriver}. */
export interface MergeDriverOptions {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  /** Which tensors of each merge are written. */
  records: MergeRecords;
  /** Where tasks go; set before any task runs. */
  tasks: () => TaskSink;
  metrics: Metrics;
  log: Logger;
  /** Merge threads of this server (0: this thread). */
  mergeWorkers: number;
  /** Called once a job is MERGED, before its uploads are deleted and `merged` goes out. */
  onMerged?: (jobId: string) => void;
}

/** The merge step and its tasks. */
export class MergeDriver implements JobStep {
  private readonly contexts = new Map<string, Promise<JobContext>>();
  /** Contexts being closed, by job: whoever releases the job (run, close) waits for them. */
  private readonly closing = new Map<string, Promise<void>>();
  private closed = false;
  private readonly lastProgress = new Map<string, number>();
  /** The dense output's weight files hashed as this server writes them, by job (taken by the commit). */
  private readonly hashes = new Map<string, WrittenFilesHash>();
  /** Another replica may have committed the job: this one learns it from the store, not from a task. */
  private readonly releaser = setInterval(() => void this.releaseFinished(), RELEASE_INTERVAL_MS).unref();

  constructor(private readonly opts: MergeDriverOptions) {}

  /** Tasks that can run at once: one per merge thread, and one more that reads and writes. */
  static lanes(mergeWorkers: number): number {
    return Math.max(1, mergeWorkers) + 1;
  }

  /**
   * Submits the job's plan task. When the tasks run here, a merge that fails
   * or is aborted leaves nothing behind and starts over next time.
   */
  async run(jobId: string, signal: AbortSignal): Promise<void> {
    let failed = false;
    let failure: unknown;
    try {
      await this.opts.tasks().submit([{ task: { kind: 'plan', jobId }, id: `${jobId}.plan` }], signal);
    } catch (err) {
      failed = true;
      failure = err;
    }
    try {
      const ended = await this.opts.records.endRun(jobId);
      if (ended !== undefined) {
        await this.release(jobId);
        await rm(this.workDir(jobId, ended), { recursive: true, force: true });
        await rm(piecesDir(this.workDir(jobId, ended)), { recursive: true, force: true });
        await rm(joinedDir(piecesDir(this.workDir(jobId, ended))), { recursive: true, force: true });
      }
    } catch (err) {
      // The merge's own error (a party sent back, an abort) says more than a failed clean-up.
      if (!failed) throw err;
      this.opts.log.warn('cannot clean up after a merge', { jobId, err });
    }
    if (failed) throw failure;
  }

  /**
   * Carries out one task taken from a queue shared by replicas, where nobody
   * waits for its outcome. Tasks of jobs that have ended are dropped (a commit
   * task first publishes the job's final event if the stream lacks it); a task
   * of a job this replica's copy shows as not yet merging is checked against
   * the bucket and handed back if the bucket agrees. Failures are thrown as
   * they are: the queue applies the failure policy (jobs/failure-policy.ts).
   */
  async handle(task: Task, signal: AbortSignal): Promise<void> {
    let job = this.opts.store.get(task.jobId);
    if (!isTerminal(job.state) && job.state !== JobState.JOB_STATE_MERGING)
      job = (await this.opts.store.fresh?.(task.jobId)) ?? job;
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
    await this.execute(task, signal);
  }

  /**
   * Carries out one task of a MERGING job; failures are thrown as they are. A party's unusable data
   * closes the job's merge here first: the party is sent back, and the next merge reads the spools again.
   */
  async execute(task: Task, signal: AbortSignal): Promise<void> {
    const job = this.opts.store.get(task.jobId);
    try {
      if (task.kind === 'plan') await this.plan(job, signal);
      else if (task.kind === 'tensor') await this.tensor(job, task.tensor!, signal);
      else await this.commit(job, signal);
    } catch (err) {
      if (err instanceof SpooledTensorError)
        await this.release(job.id).catch((e: unknown) =>
          this.opts.log.warn('cannot close a merge', { jobId: job.id, err: e }),
        );
      throw err;
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
      throw new TaskNotReadyError(
        `job ${job.id} ended moments ago; its final event may still be on its way`,
        FINAL_EVENT_GRACE_MS,
      );
    }
    if (job.state === JobState.JOB_STATE_MERGED && job.merged !== undefined) {
      await events.append(job.id, {
        merged: {
          files: job.merged.files.map((f) => f.path),
          seconds: job.merged.seconds,
          patch: job.merged.patch?.path ?? '',
        },
      });
    } else if (job.state === JobState.JOB_STATE_FAILED) {
      await events.append(job.id, { failed: { reason: job.failureReason } });
    } else {
      return;
    }
    log.warn('published the final event a replica had left out', { jobId: job.id, state: stateName(job.state) });
  }

  /**
   * Disk space the job's merge still needs to write: {@link mergeSpaceLeft}
   * (all of it before its plan ran, or once a failed run removed its output).
   */
  async spaceNeeded(jobId: string): Promise<number> {
    const job = this.opts.store.get(jobId);
    const record = await this.opts.records.get(jobId);
    if (record === undefined) return mergeSpaceBytes(job.merge.output, job.baseBytes);
    const base = await Checkpoint.open(job.basePath);
    try {
      return await mergeSpaceLeft(job.merge.output, job.baseBytes, base, bitmap(record), this.workDir(jobId, record));
    } finally {
      await base.close();
    }
  }

  private outDir(jobId: string): string {
    return join(this.opts.store.dir(jobId), 'merged');
  }

  private workDir(jobId: string, record: MergeRecord): string {
    return join(this.opts.store.dir(jobId), record.workDir ?? DEFAULT_WORK_DIR);
  }

  private async record(jobId: string): Promise<MergeRecord> {
    const record = await this.opts.records.get(jobId);
    if (record === undefined) throw new Error(`job ${jobId} has no merge record: its plan has not run`);
    return record;
  }

  private async plan(job: StoredJob, signal: AbortSignal): Promise<void> {
    const base = await Checkpoint.open(job.basePath);
    let todo: Task[];
    let record: MergeRecord;
    try {
      const outputs = mergeOutputs(job.merge.output);
      // Before anything is laid out: such a tensor would fail only once its task ran.
      if (outputs.patch) for (const t of base.tensors()) checkPatchNumel(t.numel, t.name);
      const tensors = base.tensors().map((t) => t.name);
      const isDir = (await stat(job.basePath)).isDirectory();
      record = await this.opts.records.create(job.id, tensors.length);
      if (countWritten(record) === record.tensorsTotal) {
        await this.submitCommit(job.id, signal);
        return;
      }
      if (outputs.dense)
        await SharedCheckpointWriter.layOut(
          this.workDir(job.id, record),
          this.outDir(job.id),
          base.layout,
          isDir ? { copyExtraFilesFrom: job.basePath } : {},
        );
      if (outputs.patch) await createPieces(piecesDir(this.workDir(job.id, record)));
      // Every unwritten tensor, even if some are still queued: a plan that failed midway left others unqueued.
      const written = bitmap(record);
      todo = tensors.flatMap((name, index) =>
        isSet(written, index) ? [] : [{ kind: 'tensor' as const, jobId: job.id, tensor: { name, index } }],
      );
    } finally {
      await base.close();
    }
    // Each has its own id, so a queue drops those still queued.
    await this.opts.tasks().submit(
      todo.map((task) => ({ task, id: `${job.id}.tensor.${task.tensor!.index}` })),
      signal,
    );
  }

  private async tensor(job: StoredJob, tensor: { name: string; index: number }, signal: AbortSignal): Promise<void> {
    const record = await this.record(job.id);
    if (isSet(bitmap(record), tensor.index)) {
      // Run again: the first run may have set the last bit and failed to queue the commit (dropped if queued).
      if (countWritten(record) === record.tensorsTotal) await this.submitCommit(job.id, signal);
      return;
    }
    const ctx = await this.context(job, record);
    const stop = this.releaseOnAbort(job.id, signal);
    try {
      signal.throwIfAborted();
      const info = ctx.base.info(tensor.name);
      const contributions = contributionsTo(tensor.name, ctx.parties);
      const { writer, pieces } = ctx;
      // A tensor no party changed: the base's bytes in the dense output, nothing in the patch.
      const result =
        contributions.length === 0
          ? {
              bytes: writer === undefined ? new Uint8Array(0) : await ctx.base.readRaw(tensor.name, { signal }),
              release: () => undefined,
            }
          : await ctx.runner.run(
              {
                name: tensor.name,
                contributions,
                outsideByMax: ctx.outsideByMax,
                dense: writer !== undefined,
                ...(pieces === undefined ? {} : { patchPiece: { dir: pieces, index: tensor.index } }),
              },
              info.numel,
              signal,
            );
      try {
        signal.throwIfAborted();
        // The merge wrote the tensor's patch piece already.
        await writer?.writeTensor(tensor.name, result.bytes);
        this.hashes.get(job.id)?.written(tensor.name);
      } finally {
        result.release();
      }
      this.opts.metrics.mergeTensors.inc();
      this.opts.metrics.mergeBytes.inc(info.byteLength);
    } catch (err) {
      throw signal.aborted ? signal.reason : err;
    } finally {
      signal.removeEventListener('abort', stop);
    }
    const written = await this.opts.records.markWritten(job.id, tensor.index);
    const total = record.tensorsTotal;
    const now = performance.now();
    if (written === total || now - (this.lastProgress.get(job.id) ?? 0) >= PROGRESS_INTERVAL_MS) {
      this.lastProgress.set(job.id, now);
      await this.opts.events.append(job.id, { mergeProgress: { tensorsDone: written, tensorsTotal: total } });
    }
    if (written === total) await this.submitCommit(job.id, signal);
  }

  /**
   * Closes the job's merge threads when `signal` aborts (they do not see it: closing them is what cuts a tensor
   * short); returns the listener, for the caller to remove once its run is over.
   */
  private releaseOnAbort(jobId: string, signal: AbortSignal): () => void {
    const stop = (): void =>
      void this.release(jobId).catch((err: unknown) => this.opts.log.warn('cannot close a merge', { jobId, err }));
    signal.addEventListener('abort', stop, { once: true });
    return stop;
  }

  private async commit(job: StoredJob, signal: AbortSignal): Promise<void> {
    const record = await this.record(job.id);
    if (countWritten(record) !== record.tensorsTotal) return;
    const hashed = this.hashes.get(job.id);
    this.hashes.delete(job.id);
    await this.release(job.id);
    // What this server hashed while writing (read back after each tensor); the rest is hashed after the rename.
    const known = (await hashed?.finish()) ?? new Map<string, MergedFileInfo>();
    const outputs = mergeOutputs(job.merge.output);
    let patch: MergedFileInfo | undefined;
    try {
      if (outputs.patch) patch = await this.commitPatch(job, record, signal);
    } catch (err) {
      // Merge threads opened again to make a piece again; a failure to close them must not hide the commit's.
      await this.release(job.id).catch((e: unknown) =>
        this.opts.log.warn('cannot close a merge', { jobId: job.id, err: e }),
      );
      throw err;
    }
    await this.release(job.id);
    if (outputs.dense) await SharedCheckpointWriter.commit(this.workDir(job.id, record), this.outDir(job.id));
    const files = outputs.dense ? await describeFiles(this.outDir(job.id), known) : [];
    const seconds = (Date.now() - Date.parse(record.startedAt)) / 1000;
    try {
      await transitionJob(this.opts, job.id, JobState.JOB_STATE_MERGED, {
        from: JobState.JOB_STATE_MERGING,
        change: (j) => (j.merged = { files, seconds, ...(patch === undefined ? {} : { patch }) }),
      });
    } catch (err) {
      // Another replica committed first.
      if (err instanceof StateConflictError) return;
      throw err;
    }
    this.opts.metrics.mergeDuration.observe(seconds);
    // A job shown MERGED is no longer paused, before its merged event goes out.
    this.opts.onMerged?.(job.id);
    // Before the event, so that a failure to append it cannot leave the uploads behind.
    await this.opts.spool.discardJob(job.id);
    await this.opts.events.append(job.id, {
      merged: { files: files.map((f) => f.path), seconds, patch: patch?.path ?? '' },
    });
    this.opts.log.info('job merged', { jobId: job.id, seconds, tensors: record.tensorsTotal });
  }

  /**
   * Joins the tensors' patch pieces into the job's patch file (or describes the file a commit that crashed wrote).
   * A piece missing or unusable (cut short, another version) is made again: its tensor merged once more, for the
   * piece only (the dense tensor, if any, is written and stays).
   */
  private async commitPatch(job: StoredJob, record: MergeRecord, signal: AbortSignal): Promise<MergedFileInfo> {
    const base = await Checkpoint.open(job.basePath);
    const dir = piecesDir(this.workDir(job.id, record));
    try {
      return await commitPatch(
        patchPath(this.opts.store.dir(job.id)),
        dir,
        base,
        job.baseFingerprint,
        // The tensor task's rule: a tensor has a piece when some party sent it.
        async () => {
          await this.opts.spool.ofJob(job.id);
          const parties = mergeParties(job, this.opts.spool, this.opts.store.dir(job.id));
          return new Set(base.tensors().flatMap((t) => (contributionsTo(t.name, parties).length > 0 ? [t.name] : [])));
        },
        async ({ name, index }) => {
          this.opts.log.warn('a merged-patch piece is unusable; its tensor is merged again', { jobId: job.id, name });
          // For the piece only: no dense writer, no hash of the dense output (the commit took that already).
          const ctx = await this.context(job, record, true);
          const task = {
            name,
            contributions: contributionsTo(name, ctx.parties),
            outsideByMax: ctx.outsideByMax,
            dense: false,
            patchPiece: { dir, index },
          };
          const stop = this.releaseOnAbort(job.id, signal);
          try {
            signal.throwIfAborted();
            (await ctx.runner.run(task, ctx.base.info(name).numel, signal)).release();
          } catch (err) {
            throw signal.aborted ? signal.reason : err;
          } finally {
            signal.removeEventListener('abort', stop);
          }
        },
      );
    } finally {
      await base.close();
    }
  }

  private submitCommit(jobId: string, signal: AbortSignal): Promise<void> {
    return this.opts.tasks().submit([{ task: { kind: 'commit', jobId }, id: `${jobId}.commit` }], signal);
  }

  /**
   * Opens (once) what this server needs to merge the job's tensors; `piecesOnly` for the commit's pieces made again,
   * once every tensor is written (no tensor task opens a context then; the commit releases this one).
   */
  private context(job: StoredJob, record: MergeRecord, piecesOnly = false): Promise<JobContext> {
    // After close() nothing may open merge threads again: they would keep the process alive.
    if (this.closed) return Promise.reject(new UnavailableError('the server is stopping'));
    let ctx = this.contexts.get(job.id);
    if (ctx === undefined) {
      const opening = this.openContext(job, record, piecesOnly);
      this.contexts.set(job.id, opening);
      // Only this context: the job may have been released and opened again meanwhile.
      void opening.catch(() => this.contexts.get(job.id) === opening && this.contexts.delete(job.id));
      ctx = opening;
    }
    return ctx;
  }

  private async openContext(job: StoredJob, record: MergeRecord, piecesOnly: boolean): Promise<JobContext> {
    // Uploads may have landed on every replica (they no longer change once the job merges).
    await this.opts.spool.ofJob(job.id);
    const parties = mergeParties(job, this.opts.spool, this.opts.store.dir(job.id));
    const base = await Checkpoint.open(job.basePath);
    try {
      for (const p of parties) {
        for (const [name, file] of p.tensors) {
          if (!base.has(name))
            throw new FormatError(`party ${p.name} sent a tensor the base does not have`, { file, tensor: name });
        }
      }
      const outputs = mergeOutputs(job.merge.output);
      const writer =
        outputs.dense && !piecesOnly
          ? await SharedCheckpointWriter.open(this.workDir(job.id, record), this.outDir(job.id), base.layout)
          : undefined;
      const pieces = outputs.patch ? piecesDir(this.workDir(job.id, record)) : undefined;
      if (writer !== undefined) {
        const hash = new WrittenFilesHash(this.workDir(job.id, record), this.outDir(job.id), base.layout);
        const written = bitmap(record);
        base.tensors().forEach((t, i) => isSet(written, i) && hash.written(t.name));
        await this.hashes.get(job.id)?.close();
        this.hashes.set(job.id, hash);
      }
      const { mergeWorkers } = this.opts;
      const runner = mergeWorkers === 0 ? inlineRunner(base) : workerRunner(job.basePath, mergeWorkers);
      return { base, runner, writer, pieces, parties, outsideByMax: job.dpa.scaleOutsideByMax };
    } catch (err) {
      await base.close();
      throw err;
    }
  }

  /** Closes what this server holds open for a job; resolves once it is closed, also when another caller started closing it. */
  private release(jobId: string): Promise<void> {
    const ctx = this.contexts.get(jobId);
    const hash = this.hashes.get(jobId);
    this.hashes.delete(jobId);
    void hash?.close();
    if (ctx !== undefined) {
      this.contexts.delete(jobId);
      this.lastProgress.delete(jobId);
      const before = this.closing.get(jobId);
      const closing: Promise<void> = Promise.all([before, closeContext(ctx)])
        .then(() => undefined)
        .finally(() => this.closing.get(jobId) === closing && this.closing.delete(jobId));
      this.closing.set(jobId, closing);
    }
    return this.closing.get(jobId) ?? Promise.resolve();
  }

  private async releaseFinished(): Promise<void> {
    for (const id of [...this.contexts.keys()]) {
      const state = this.opts.store.list().find((j) => j.id === id)?.state;
      if (state !== JobState.JOB_STATE_MERGING)
        await this.release(id).catch((err: unknown) => this.opts.log.warn('cannot close a merge', { jobId: id, err }));
    }
  }

  /** Closes everything held for every job (after the queue stopped). */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.releaser);
    await Promise.all([...[...this.contexts.keys()].map((id) => this.release(id)), ...this.closing.values()]);
  }
}

/** Closes the merge threads, the writer and the base, each even if one before it failed. */
async function closeContext(ctx: Promise<JobContext>): Promise<void> {
  const c = await ctx.catch(() => undefined);
  if (c === undefined) return;
  try {
    await c.runner.close();
  } finally {
    try {
      await c.writer?.close();
    } finally {
      await c.base.close();
    }
  }
}
