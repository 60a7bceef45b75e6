/**
 * Drives jobs through their life cycle once uploads are in:
 * COLLECTING → (DPA) → MERGING → MERGED, or FAILED. A party whose spooled
 * data turns out unusable in the search or the merge sends the job back to
 * COLLECTING until it has sent the data again (jobs/party-stops.ts).
 *
 * A job whose factors are searched goes COLLECTING → DPA, where every party's
 * factor search runs (dpa/job-search.ts) and records the chosen factors, then
 * DPA → MERGING. Jobs with DPA off or fixed factors go straight to MERGING.
 *
 * Searches and merges run under an AbortController: stopping the server
 * aborts them and leaves the job where it was (DPA or MERGING), to carry on at
 * the next start (a search from its recorded evaluations, a merge from the
 * beginning: its output is only ever renamed into place when complete);
 * cancelling the job aborts them and fails the job.
 *
 * A storage failure (a full disk, an I/O error) on the way fails nothing: the
 * job keeps its state, is paused with the reason (shown in `Job.pause`,
 * announced as a `paused` event) and tried again with backoff, a merge only
 * once the disk has room for its output (storage-pauses.ts), or at once by
 * {@link JobRunner.resumeJob}. Nothing of the failed attempt stays: a merge's
 * output is only renamed into place when complete.
 *
 * With `--cluster` ({@link JobRunnerDeps.distributed}) searches and merges
 * do not run here: the runner asks for them, and the replicas' tasks carry
 * them out and move the job on (DPA → MERGING → MERGED). Every move is checked against the state the
 * job is in, so when two replicas try the same one, one wins and the other
 * leaves the job alone; and the runner looks at every unfinished job again
 * every few seconds, so that a move missed while NATS was away happens once
 * it is back.
 */
import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { JobState, type Pause } from '../../proto/gen/dppa/v1/jobs.js';
import { searchJob } from '../dpa/job-search.js';
import type { RemoteEvaluators } from '../dpa/remote-evaluators.js';
import {
  type DiskFullError,
  FailedPreconditionError,
  NatsUnavailableError,
  storageError,
  type StorageUnavailableError,
  UnavailableError,
} from '../errors.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { mergeCheckpoint, type MergeParty } from '../merge/merger.js';
import { mergeOutputs, patchPath } from '../merge/patch-output.js';
import { SpooledTensorError } from '../merge/tensor-merge.js';
import type { Spool } from '../uploads/spool.js';
import type { JobEvents } from './job-events.js';
import { partyFactors, partyWeight, searchesFactors } from './job-spec.js';
import { isTerminal, stateName, type JobStore, type StoredJob } from './job-store.js';
import { failJob, StateConflictError, transitionJob } from './job-transitions.js';
import { DEFAULT_STORAGE_RETRY_MS, StoragePauses } from './storage-pauses.js';
import { clearSentBack, resumeParty, sendPartyBack } from './party-stops.js';

/** Shortest interval between two merge_progress events (the last one is always sent). */
export const PROGRESS_INTERVAL_MS = 250;

/** With a distributed merge: how often every unfinished job is looked at again. */
const SWEEP_INTERVAL_MS = 5000;

/** A step of a job run as tasks shared by the replicas (cluster/): the runner only asks for it. */
export interface DistributedStep {
  /** Makes sure the step of the job is under way on some replica; idempotent. @throws NatsUnavailableError while NATS is away. */
  request(jobId: string): Promise<void>;
}

/** Why a search or merge was aborted: the job was cancelled (it fails) rather than the server stopping (it stays where it was). */
class JobCancelled extends Error {
  override name = 'JobCancelled';
}

/** Dependencies of {@link JobRunner}. */
export interface JobRunnerDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  metrics: Metrics;
  log: Logger;
  /** Worker threads of each merge (0: the main thread). */
  mergeWorkers: number;
  /** Evaluation requests to the parties whose evaluator is remote. */
  broker: RemoteEvaluators;
  /** Set with `--cluster`: searches and merges are tasks of the replicas instead of running in this process. @default none */
  distributed?: { search: DistributedStep; merge: DistributedStep };
  /** First wait before a job paused by a storage failure is tried again; doubles after each failure, up to 5 minutes. @default 5000 */
  storageRetryMs?: number;
}

/** Moves jobs along; one instance per server. */
export class JobRunner {
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  /** Jobs poked while their run was in progress: looked at again when it ends. */
  private readonly again = new Set<string>();
  private stopped = false;
  private sweep: NodeJS.Timeout | undefined;
  private readonly pauses: StoragePauses;

  constructor(private readonly deps: JobRunnerDeps) {
    this.pauses = new StoragePauses({
      initialMs: deps.storageRetryMs ?? DEFAULT_STORAGE_RETRY_MS,
      retry: (jobId) => this.run(jobId),
      hasRoom: (jobId) => this.hasRoom(jobId),
    });
  }

  /**
   * Picks up where the last run stopped: jobs whose uploads are all in, and
   * jobs that were searching or merging. With a distributed merge, does so
   * again every few seconds until stopped.
   */
  resume(): void {
    for (const job of this.deps.store.list()) if (!isTerminal(job.state)) this.poke(job.id);
    if (this.deps.distributed !== undefined && this.sweep === undefined && !this.stopped) {
      this.sweep = setInterval(() => {
        for (const job of this.deps.store.list()) if (!isTerminal(job.state)) this.poke(job.id);
      }, SWEEP_INTERVAL_MS).unref();
    }
  }

  /**
   * Moves a job on if it can go further (called when a party's upload
   * completes); a job paused by a storage failure waits for its next attempt.
   * Never throws: failures fail the job, storage failures pause it.
   */
  poke(jobId: string): void {
    if (!this.pauses.waiting(jobId)) this.run(jobId);
  }

  /** The job's pause, while a storage failure holds it up. */
  pause(jobId: string): Pause | undefined {
    return this.pauses.get(jobId);
  }

  /**
   * ResumeJob: tries a paused job again at once; any other job that has not
   * ended is looked at again (as at a start).
   * @returns The job as it is now.
   * @throws FailedPreconditionError if the job has merged or failed; NotFoundError.
   */
  resumeJob(jobId: string): StoredJob {
    const job = this.deps.store.get(jobId);
    if (isTerminal(job.state)) throw new FailedPreconditionError(`job ${jobId} is ${stateName(job.state)}: there is nothing to resume`);
    if (!this.pauses.retryNow(jobId)) this.poke(jobId);
    return job;
  }

  private run(jobId: string): void {
    if (this.stopped) return;
    if (this.running.has(jobId)) {
      this.again.add(jobId);
      return;
    }
    const controller = new AbortController();
    const done = this.advance(jobId, controller.signal)
      .then(
        () => this.unpause(jobId),
        (err: unknown) => {
          // Another replica moved the job first; or NATS is away and the next sweep tries again.
          if (err instanceof StateConflictError) return;
          const storage = storageError(err);
          if (storage !== undefined && !controller.signal.aborted) this.pauseJob(jobId, storage, err);
          else if (err instanceof NatsUnavailableError) this.deps.log.warn('job runner waits for NATS', { jobId, err: err.message });
          else this.deps.log.error('job runner failed', { jobId, err });
        },
      )
      .finally(() => {
        this.running.delete(jobId);
        if (this.again.delete(jobId) && !controller.signal.aborted) this.poke(jobId);
      });
    this.running.set(jobId, { controller, done });
  }

  /**
   * Fails a job that has not merged: aborts its search or merge if one runs,
   * then records the reason.
   * @returns The job as failed, or unchanged if it had already ended.
   */
  async cancel(jobId: string, reason: string): Promise<StoredJob> {
    const run = this.running.get(jobId);
    if (run !== undefined) {
      run.controller.abort(new JobCancelled(reason));
      await run.done;
    }
    this.unpause(jobId);
    const job = this.deps.store.get(jobId);
    if (isTerminal(job.state)) return job;
    return this.fail(jobId, reason);
  }

  /** A party whose search stopped rejoins it (opens an evaluation stream): its search resumes. */
  async rejoin(jobId: string, party: string): Promise<void> {
    if (await resumeParty(this.deps, jobId, party)) this.poke(jobId);
  }

  /** Aborts every search and merge in progress and waits for them to clean up; their jobs stay DPA or MERGING. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.sweep);
    this.pauses.stop();
    const runs = [...this.running.values()];
    for (const r of runs) r.controller.abort(new UnavailableError('server is shutting down'));
    await Promise.all(runs.map((r) => r.done));
  }

  /** Records a storage failure: the job waits for its next attempt, with the reason shown and announced. */
  private pauseJob(jobId: string, storage: DiskFullError | StorageUnavailableError, err: unknown): void {
    const { log, events, metrics } = this.deps;
    const pause = this.pauses.add(jobId, storage);
    metrics.jobsPaused.set(this.pauses.size);
    log.warn('job paused by a storage failure', { jobId, attempts: pause.attempts, nextAttemptAt: pause.nextAttemptAt, err });
    events.append(jobId, { paused: pause }).catch((e: unknown) => log.warn('cannot announce a paused job', { jobId, err: e }));
  }

  private unpause(jobId: string): void {
    if (this.pauses.get(jobId) === undefined) return;
    this.pauses.clear(jobId);
    this.deps.metrics.jobsPaused.set(this.pauses.size);
  }

  /** Whether the data folder's disk has room for the job's next step: a merge needs about the base's size. */
  private async hasRoom(jobId: string): Promise<boolean> {
    const job = this.deps.store.get(jobId);
    if (job.state !== JobState.JOB_STATE_MERGING) return true;
    const fs = await statfs(this.deps.store.dir(jobId));
    return fs.bavail * fs.bsize >= job.baseBytes;
  }

  /** True when every party's upload is complete (spools shared by replicas are read again first). */
  private async allUploaded(job: StoredJob): Promise<boolean> {
    await this.deps.spool.refreshJob(job.id);
    return job.parties.every((p) => this.deps.spool.party(job.id, p.name).complete);
  }

  private async advance(jobId: string, signal: AbortSignal): Promise<void> {
    let job = this.deps.store.get(jobId);
    if (job.state === JobState.JOB_STATE_COLLECTING && (await this.allUploaded(job))) {
      job = await this.transition(jobId, JobState.JOB_STATE_COLLECTING, searchesFactors(job) ? JobState.JOB_STATE_DPA : JobState.JOB_STATE_MERGING, clearSentBack);
    }
    if (job.state === JobState.JOB_STATE_DPA) {
      // Distributed: the last party's search task moves the job to MERGING.
      if (this.deps.distributed !== undefined) return this.deps.distributed.search.request(jobId);
      if (!(await this.search(job, signal))) return;
      job = await this.transition(jobId, JobState.JOB_STATE_DPA, JobState.JOB_STATE_MERGING);
    }
    if (job.state !== JobState.JOB_STATE_MERGING) return;
    if (this.deps.distributed !== undefined) await this.deps.distributed.merge.request(jobId);
    else await this.merge(job, signal);
  }

  /**
   * Runs the job's factor searches; false when they did not all choose factors: stopped, failed (the
   * job failed then), or a party's work stopped (the job waits for it).
   */
  private async search(job: StoredJob, signal: AbortSignal): Promise<boolean> {
    const { log } = this.deps;
    try {
      await searchJob(this.deps, job.id, signal);
      const after = this.deps.store.get(job.id);
      return after.state === JobState.JOB_STATE_DPA && after.parties.every((p) => p.chosen !== undefined);
    } catch (err) {
      if (signal.aborted) {
        // Cancelled: cancel() records the failure. Shutting down: stays DPA, resumed at the next start.
        log.info('DPA search stopped', { jobId: job.id, reason: String(signal.reason) });
        return false;
      }
      // A full or failing disk pauses the job instead (run()); the search resumes from its recorded evaluations.
      if (storageError(err) !== undefined) throw err;
      log.error('DPA search failed', { jobId: job.id, err });
      await this.fail(job.id, `DPA search failed: ${err instanceof Error ? err.message : String(err)}`);
      return false;
    }
  }

  private async merge(job: StoredJob, signal: AbortSignal): Promise<void> {
    const { events, metrics, log } = this.deps;
    const started = performance.now();
    let lastProgress = 0;
    try {
      const outputs = mergeOutputs(job.merge.output);
      const result = await mergeCheckpoint({
        basePath: job.basePath,
        outDir: join(this.deps.store.dir(job.id), 'merged'),
        dense: outputs.dense,
        ...(outputs.patch ? { patch: { path: patchPath(this.deps.store.dir(job.id)), baseFingerprint: job.baseFingerprint } } : {}),
        parties: mergeParties(job, this.deps.spool),
        outsideByMax: job.dpa.scaleOutsideByMax,
        workers: this.deps.mergeWorkers,
        signal,
        onProgress: (p) => {
          metrics.mergeTensors.inc();
          metrics.mergeBytes.inc(p.tensorBytes);
          const now = performance.now();
          if (p.tensorsDone < p.tensorsTotal && now - lastProgress < PROGRESS_INTERVAL_MS) return;
          lastProgress = now;
          void events.append(job.id, { mergeProgress: { tensorsDone: p.tensorsDone, tensorsTotal: p.tensorsTotal } });
        },
      });
      const seconds = (performance.now() - started) / 1000;
      metrics.mergeDuration.observe(seconds);
      await this.transition(job.id, JobState.JOB_STATE_MERGING, JobState.JOB_STATE_MERGED, (j) => (j.merged = { files: result.files, seconds, ...(result.patch === undefined ? {} : { patch: result.patch }) }));
      // A job shown MERGED is no longer paused, before its merged event goes out.
      this.unpause(job.id);
      // Before the event, so that a failure to append it cannot leave the uploads behind.
      await this.deps.spool.discardJob(job.id);
      await events.append(job.id, { merged: { files: result.files.map((f) => f.path), seconds, patch: result.patch?.path ?? '' } });
      log.info('job merged', { jobId: job.id, seconds, tensorsMerged: result.tensorsMerged, tensorsCopied: result.tensorsCopied });
    } catch (err) {
      if (signal.aborted) {
        // Cancelled: cancel() records the failure. Shutting down: stays MERGING, merged again at the next start.
        log.info('merge aborted', { jobId: job.id, reason: String(signal.reason) });
        return;
      }
      // A full or failing disk pauses the job instead (run()): it merges again, from the start, later.
      if (storageError(err) !== undefined) throw err;
      // One party's data: that party sends it again, the job is kept.
      if (err instanceof SpooledTensorError) {
        await sendPartyBack(this.deps, job.id, JobState.JOB_STATE_MERGING, err);
        return;
      }
      log.error('merge failed', { jobId: job.id, err });
      await this.fail(job.id, `merge failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  /** Changes a job's state from `from`, records it and announces it. @throws StateConflictError if it is no longer in `from`. */
  private transition(jobId: string, from: JobState, to: JobState, change?: (job: StoredJob) => void): Promise<StoredJob> {
    return transitionJob(this.deps, jobId, to, { from, ...(change === undefined ? {} : { change }) });
  }

  private async fail(jobId: string, reason: string): Promise<StoredJob> {
    const job = await failJob(this.deps, jobId, reason);
    // Parties waiting on an evaluation stream learn why nothing more will come.
    this.deps.broker.endJob(jobId, new FailedPreconditionError(`job ${jobId} failed: ${reason}`));
    return job;
  }
}

/**
 * The parties of a job as the merge takes them: in the job's order, with weight, factors and spooled tensors.
 * @throws SpooledTensorError for a tensor planned but not held (dropped by a send-back cut short): a merge must never leave out a tensor;
 *   Error if a party has no upload.
 */
export function mergeParties(job: StoredJob, spool: Spool): MergeParty[] {
  return job.parties.map(({ name }) => {
    const s = spool.party(job.id, name);
    if (s.header === undefined) throw new Error(`party ${name} has sent nothing`);
    const missing = s.header.tensors.findIndex((t) => t.sent && !s.held.has(t.name));
    if (missing >= 0) {
      const file = join(s.dir, `${missing}.dppa`);
      const tensor = s.header.tensors[missing]!.name;
      throw new SpooledTensorError(name, `${file}, tensor "${tensor}": the spool file is gone`, file, tensor);
    }
    const factors = partyFactors(job, name, s.header.levels.length);
    if (factors === undefined) throw new Error(`party ${name} has no factors`);
    return { name, weight: partyWeight(job, name), factors, tensors: new Map([...s.held.values()].map((t) => [t.name, t.file])) };
  });
}
