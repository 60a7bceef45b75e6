/**
 * Drives jobs once their uploads are in: COLLECTING → (DPA) → MERGING →
 * MERGED, or FAILED, through the backend's search and merge steps
 * (jobs/job-step.ts). A stop leaves a job where it was, a cancel fails it; a
 * failed step or task gets the failure policy's verdict (failure-policy.ts):
 * paused (storage-pauses.ts), party sent back (party-stops.ts) or failed.
 * docs/design/job-flow.md, "The runner" and "One failure policy".
 */
import { messageOf } from '../../proto/errors.js';
import { statfs } from 'node:fs/promises';
import { JobState, type Pause } from '../../proto/gen/dppa/v1/jobs.js';
import type { RemoteEvaluators } from '../dpa/remote-evaluators.js';
import {
  type DiskFullError,
  FailedPreconditionError,
  storageError,
  type StorageUnavailableError,
  UnavailableError,
} from '../errors.js';
import type { Logger } from '../log.js';
import { SecureAggregationError } from '../../proto/secure/errors.js';
import type { SecureJobs } from '../secure/secure-jobs.js';
import type { Metrics } from '../metrics.js';
import { mergeSpaceBytes } from '../merge/patch-output.js';
import type { Spool } from '../uploads/spool.js';
import type { FailurePolicy, StepName } from './failure-policy.js';
import type { JobEvents } from './job-events.js';
import { searchesFactors } from './job-spec.js';
import type { JobStep } from './job-step.js';
import { isTerminal, stateName, type JobStore, type StoredJob } from './job-store.js';
import { failJob, StateConflictError, transitionJob } from './job-transitions.js';
import { DEFAULT_STORAGE_RETRY_MS, StoragePauses } from './storage-pauses.js';
import { clearSentBack, resumeParty, sendPartyBack } from './party-stops.js';

/** A task whose party was sent back comes back after this long (it runs once the job is past collecting again). */
const SENT_BACK_RETRY_MS = 2000;

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
  /** Evaluation requests to the parties whose evaluator is remote. */
  broker: RemoteEvaluators;
  /** The factor search and the merge, as the backend carries them out (`queued`: JobSteps.queued). */
  steps: { search: JobStep; merge: JobStep; queued?: boolean };
  /** What a failed step does to its job. */
  policy: FailurePolicy;
  /** How often every unfinished job is looked at again (a move missed while the shared state was away). @default never */
  sweepMs?: number | undefined;
  /** The phases of secure jobs. */
  secure?: SecureJobs;
  /** First wait before a job paused by a storage failure is tried again; doubles after each failure, up to 5 minutes. @default 5000 */
  storageRetryMs?: number;
}

/** Moves jobs along; one instance per server. */
export class JobRunner {
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  /** Jobs poked while their run was in progress: looked at again when it ends. */
  private readonly again = new Set<string>();
  /** Failed runs in a row of a secure job's phase closing (failure policy). */
  private readonly secureAttempts = new Map<string, number>();
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
   * jobs that were searching or merging. With `sweepMs`, does so again
   * that often until stopped.
   */
  resume(): void {
    for (const job of this.deps.store.list()) if (!isTerminal(job.state)) this.poke(job.id);
    const { sweepMs } = this.deps;
    if (sweepMs !== undefined && this.sweep === undefined && !this.stopped) {
      this.sweep = setInterval(() => {
        for (const job of this.deps.store.list()) {
          // A pause this replica recorded ends when the job ends or goes on, wherever that happened.
          if (isTerminal(job.state) || this.pauses.outgrown(job.id, progressOf(job))) this.unpause(job.id);
          if (!isTerminal(job.state)) this.poke(job.id);
          else {
            // Ended on another replica (or its fail() lost a race): drop what this one still holds for it.
            this.secureAttempts.delete(job.id);
            this.deps.secure?.forget(job.id);
          }
        }
      }, sweepMs).unref();
    }
  }

  /** A job just moved to MERGED: it is no longer paused (called before its merged event goes out). */
  merged(jobId: string): void {
    this.unpause(jobId);
    this.deps.secure?.forget(jobId);
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
    if (isTerminal(job.state))
      throw new FailedPreconditionError(`job ${jobId} is ${stateName(job.state)}: there is nothing to resume`);
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
        () => {
          // With tasks on a queue shared by replicas, a paused job goes again once a task succeeds (taskDone).
          const { state } = this.deps.store.get(jobId);
          if (
            this.deps.steps.queued !== true ||
            (state !== JobState.JOB_STATE_DPA && state !== JobState.JOB_STATE_MERGING)
          )
            this.unpause(jobId);
        },
        (err: unknown) => {
          // Another replica moved the job first.
          if (err instanceof StateConflictError) return;
          const kind = this.deps.policy.kind(err);
          if (kind === 'storage' && !controller.signal.aborted) this.pauseJob(jobId, storageError(err)!, err);
          // The shared state is away: the next sweep tries again.
          else if (kind === 'transient') this.deps.log.warn('job runner waits for the backend', { jobId, err });
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

  /**
   * Applies the failure policy's verdict on a failed step (or a task's final
   * failure) of a job: pauses it, sends the party back, waits, or fails it.
   * @returns After how many ms a task that failed is handed back; undefined when the job failed (the task is done with).
   * @throws What prevented recording the verdict (e.g. NATS away).
   */
  async stepFailed(jobId: string, step: StepName, err: unknown): Promise<number | undefined> {
    const { log, policy } = this.deps;
    const verdict = policy.verdict(step, err);
    switch (verdict.action) {
      case 'pause':
        return this.pauseJob(jobId, verdict.storage, err);
      case 'send-back':
        await sendPartyBack(this.deps, jobId, stepState(step), verdict.err);
        return SENT_BACK_RETRY_MS;
      case 'wait':
        log.warn(`${step} waits for the backend`, { jobId, err });
        return policy.retryDelayMs(1);
      case 'fail':
        try {
          await this.fail(jobId, verdict.reason, stepState(step));
          log.error(`${step} failed`, { jobId, err });
        } catch (e) {
          if (!(e instanceof StateConflictError)) throw e;
          // The job is past this step (ended, another replica failed it first, or its party was sent back
          // and it runs the step anew): the late failure is dropped with its task.
          log.warn(`${step} failed after its job moved on; dropped`, { jobId, err });
        }
        this.unpause(jobId);
        return undefined;
    }
  }

  /** A task of the job succeeded: a job paused by a storage failure is going again. */
  taskDone(jobId: string): void {
    this.unpause(jobId);
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

  /**
   * Records a storage failure: the job waits for its next attempt, with the reason shown and announced.
   * @returns The wait until that attempt, in ms.
   */
  private pauseJob(jobId: string, storage: DiskFullError | StorageUnavailableError, err: unknown): number {
    const { log, events, metrics, policy } = this.deps;
    // Already waiting (every queued task of the job meets the full disk): one pause, one event.
    if (this.pauses.waiting(jobId)) return untilNext(this.pauses.get(jobId)!, policy);
    const pause = this.pauses.add(jobId, storage, this.progress(jobId));
    metrics.jobsPaused.set(this.pauses.size);
    log.warn('job paused by a storage failure', {
      jobId,
      attempts: pause.attempts,
      nextAttemptAt: pause.nextAttemptAt,
      err,
    });
    events
      .append(jobId, { paused: pause })
      .catch((e: unknown) => log.warn('cannot announce a paused job', { jobId, err: e }));
    return untilNext(pause, policy);
  }

  /** The job's progress marker ({@link progressOf}); '' for a job this replica does not know. */
  private progress(jobId: string): string {
    try {
      return progressOf(this.deps.store.get(jobId));
    } catch {
      return '';
    }
  }

  private unpause(jobId: string): void {
    if (this.pauses.get(jobId) === undefined) return;
    this.pauses.clear(jobId);
    this.deps.metrics.jobsPaused.set(this.pauses.size);
  }

  /**
   * Whether the data folder's disk has room for the job's next step: what a
   * merge's dense output and/or patch still need, less what is written already.
   */
  private async hasRoom(jobId: string): Promise<boolean> {
    const job = this.deps.store.get(jobId);
    if (job.state !== JobState.JOB_STATE_MERGING) return true;
    const { merge } = this.deps.steps;
    const need =
      merge.spaceNeeded === undefined
        ? mergeSpaceBytes(job.merge.output, job.baseBytes)
        : await merge.spaceNeeded(jobId);
    const fs = await statfs(this.deps.store.dir(jobId));
    return fs.bavail * fs.bsize >= need;
  }

  /** True when every party's upload is complete. */
  private async allUploaded(job: StoredJob): Promise<boolean> {
    return [...(await this.deps.spool.ofJob(job.id)).values()].every((s) => s.complete);
  }

  private async advance(jobId: string, signal: AbortSignal): Promise<void> {
    let job = this.deps.store.get(jobId);
    if (job.secure !== undefined && job.state === JobState.JOB_STATE_COLLECTING) {
      // A secure job's phases (server/secure/): it merges once the masks are removed from the sum.
      if (!(await this.secure(job, signal))) return;
      job = await this.transition(jobId, JobState.JOB_STATE_COLLECTING, JobState.JOB_STATE_MERGING);
    } else if (job.state === JobState.JOB_STATE_COLLECTING && (await this.allUploaded(job))) {
      job = await this.transition(
        jobId,
        JobState.JOB_STATE_COLLECTING,
        searchesFactors(job) ? JobState.JOB_STATE_DPA : JobState.JOB_STATE_MERGING,
        clearSentBack,
      );
    }
    if (job.state === JobState.JOB_STATE_DPA) {
      // Searches queued as tasks: the last one moves the job to MERGING.
      if (!(await this.search(job, signal))) return;
      job = await this.transition(jobId, JobState.JOB_STATE_DPA, JobState.JOB_STATE_MERGING);
    }
    if (job.state !== JobState.JOB_STATE_MERGING) return;
    await this.merge(job, signal);
  }

  /**
   * Closes the secure job's phases that can close; true once its sum is unmasked. Too few parties fail the job;
   * another failure goes by the failure policy: a storage failure pauses it (run()), one the backend expects to
   * pass waits for the next sweep, an unexpected one is tried again up to the attempt limit, then the job fails.
   */
  private async secure(job: StoredJob, signal: AbortSignal): Promise<boolean> {
    const secure = this.deps.secure;
    if (secure === undefined) return false;
    try {
      const done = await secure.advance(job.id, signal);
      this.secureAttempts.delete(job.id);
      return done;
    } catch (err) {
      if (signal.aborted || err instanceof StateConflictError) throw err;
      if (err instanceof SecureAggregationError) {
        this.deps.log.warn('secure job failed', { jobId: job.id, err: err.message });
        await this.fail(job.id, `${err.name}: ${err.message}`);
        return false;
      }
      const { policy, log } = this.deps;
      const kind = policy.kind(err);
      if (kind === 'storage' || kind === 'transient') throw err;
      if (kind === 'party') {
        // A damaged support cannot be sent back: the union is built once, from the supports as they are.
        log.error('secure phase could not close', { jobId: job.id, err });
        await this.fail(job.id, `secure aggregation failed: ${messageOf(err)}`);
        return false;
      }
      const attempt = (this.secureAttempts.get(job.id) ?? 0) + 1;
      if (policy.retries(err, attempt)) {
        this.secureAttempts.set(job.id, attempt);
        log.warn('secure phase could not close; tried again', { jobId: job.id, attempt, err });
        setTimeout(() => this.poke(job.id), policy.retryDelayMs(attempt)).unref();
        return false;
      }
      this.secureAttempts.delete(job.id);
      await this.stepFailed(job.id, 'secure aggregation', policy.final(err, attempt));
      return false;
    }
  }

  /**
   * Runs the job's factor searches; false when they did not all choose factors: stopped, failed (the
   * job failed then), or a party's work stopped (the job waits for it).
   */
  private async search(job: StoredJob, signal: AbortSignal): Promise<boolean> {
    try {
      await this.deps.steps.search.run(job.id, signal);
      const after = this.deps.store.get(job.id);
      return after.state === JobState.JOB_STATE_DPA && after.parties.every((p) => p.chosen !== undefined);
    } catch (err) {
      // The search resumes from its recorded evaluations.
      await this.stepError(job.id, 'DPA search', err, signal);
      return false;
    }
  }

  private async merge(job: StoredJob, signal: AbortSignal): Promise<void> {
    try {
      await this.deps.steps.merge.run(job.id, signal);
    } catch (err) {
      // A merge tried again starts from the beginning.
      await this.stepError(job.id, 'merge', err, signal);
    }
  }

  /** A step this runner waited for failed or was aborted. @throws A storage failure: run() pauses the job. */
  private async stepError(jobId: string, step: StepName, err: unknown, signal: AbortSignal): Promise<void> {
    if (signal.aborted) {
      // Cancelled: cancel() records the failure. Shutting down: the job stays where it is, resumed at the next start.
      this.deps.log.info(`${step} stopped`, { jobId, reason: String(signal.reason) });
      return;
    }
    // Paused by run(), like a failed move of the job (the run must not count as done).
    if (this.deps.policy.kind(err) === 'storage') throw err;
    await this.stepFailed(jobId, step, err);
  }

  /** Changes a job's state from `from`, records it and announces it. @throws StateConflictError if it is no longer in `from`. */
  private transition(
    jobId: string,
    from: JobState,
    to: JobState,
    change?: (job: StoredJob) => void,
  ): Promise<StoredJob> {
    return transitionJob(this.deps, jobId, to, { from, ...(change === undefined ? {} : { change }) });
  }

  private async fail(jobId: string, reason: string, from?: JobState): Promise<StoredJob> {
    const job = await failJob(this.deps, jobId, reason, from);
    await this.deps.spool.discardSecure(jobId);
    this.secureAttempts.delete(jobId);
    this.deps.secure?.forget(jobId);
    // Parties waiting on an evaluation stream learn why nothing more will come.
    this.deps.broker.endJob(jobId, new FailedPreconditionError(`job ${jobId} failed: ${reason}`));
    return job;
  }
}

/** The state a job is in while `step` runs. */
function stepState(step: StepName): JobState {
  if (step === 'merge') return JobState.JOB_STATE_MERGING;
  // Secure phases run while the job collects.
  return step === 'secure aggregation' ? JobState.JOB_STATE_COLLECTING : JobState.JOB_STATE_DPA;
}

/** What says a job went on (its state, the evaluations its searches recorded): a pause recorded before it is stale. */
function progressOf(job: StoredJob): string {
  return `${job.state}/${job.evaluations.length}/${job.parties.filter((p) => p.chosen !== undefined).length}`;
}

/** Ms until a pause's next attempt; after the runner stopped (no attempt scheduled), a task's first retry delay. */
function untilNext(pause: Pause, policy: FailurePolicy): number {
  const ms = Date.parse(pause.nextAttemptAt) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : policy.retryDelayMs(1);
}
