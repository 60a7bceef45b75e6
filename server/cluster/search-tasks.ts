/**
 * The DPA factor search with `--cluster`: one `search` task per party on the
 * search queue (task-queue.ts, consumer `dppa-searchers`), from which each
 * replica takes one task at a time, so that the searches of different parties
 * run on different replicas.
 *
 * A search records every evaluation in the job (the KV bucket) before it goes
 * on, so a search task that runs again (its replica died, or NATS went away)
 * resumes from the recorded evaluations, repeating none (dpa/job-search.ts).
 * The task is acknowledged once the party's factors are chosen; the replica
 * that finds every party's factors chosen moves the job DPA → MERGING (against
 * the job's revision) and asks for the merge.
 *
 * Only the server-side (ONNX) evaluator runs on a cluster: a remote
 * evaluator's party would have to reach the replica running its search.
 */
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { searchPartyFactors, SearchFailedError, type JobSearchDeps } from '../dpa/job-search.js';
import { NatsUnavailableError } from '../errors.js';
import type { JobStep } from '../jobs/job-step.js';
import { failJob, StateConflictError, transitionJob } from '../jobs/job-transitions.js';
import { TaskNotReadyError, type Task, type TaskQueue } from './task-queue.js';

/** Options of {@link SearchTasks}: what a search needs (its `broker` stays unused: no remote evaluator on a cluster), and the queues. */
export interface SearchTasksOptions extends JobSearchDeps {
  /** Where search tasks are queued. */
  queue: () => TaskQueue;
  /** Asked for once the job merges. */
  merge: JobStep;
}

/** The searches' tasks: asking for them, and carrying them out. */
export class SearchTasks implements JobStep {
  constructor(private readonly opts: SearchTasksOptions) {}

  /**
   * Queues a search task for every party of a DPA job without chosen
   * factors, unless there are as many search tasks of the job queued as such
   * parties (they will finish the job). Each party's task has its own
   * `Nats-Msg-Id`, so JetStream drops one queued within its window; a request
   * that failed midway queues the rest when it runs again.
   */
  async run(jobId: string, signal: AbortSignal): Promise<void> {
    const job = this.opts.store.get(jobId);
    const queue = this.opts.queue();
    const unchosen = job.parties.filter((p) => p.chosen === undefined);
    // Not simply "any queued": a request that failed midway left some parties without a task.
    if (unchosen.length > 0 && (await queue.queued(jobId, 'search')) < unchosen.length) {
      for (const p of unchosen) await queue.publish({ kind: 'search', jobId, party: p.name }, `${jobId}.search.${p.name}`);
    }
    // Every party chosen (the move to MERGING was missed): make it now.
    if (job.parties.every((p) => p.chosen !== undefined)) await this.toMerging(jobId, signal);
  }

  /** Runs one party's search (or resumes it), then moves the job on if it was the last. */
  async handle(task: Task, signal: AbortSignal): Promise<void> {
    const { store } = this.opts;
    let job = store.get(task.jobId);
    // This replica's copy may lag the bucket: only a job past its search (merging or ended) drops the task.
    if (job.state === JobState.JOB_STATE_COLLECTING) job = (await store.fresh?.(task.jobId)) ?? job;
    if (job.state === JobState.JOB_STATE_COLLECTING) throw new TaskNotReadyError(`job ${job.id} is COLLECTING here, not yet DPA`);
    if (job.state !== JobState.JOB_STATE_DPA) return;
    const party = task.party!;
    if (job.parties.find((p) => p.name === party)?.chosen === undefined) {
      await this.opts.spool.ofParty(job.id, party);
      try {
        await searchPartyFactors(this.opts, job.id, party, signal);
      } catch (err) {
        // NATS away while recording: the task comes back and the search resumes from what was recorded.
        if (signal.aborted || !(err instanceof SearchFailedError) || err.cause instanceof NatsUnavailableError) throw err;
        this.opts.log.error('DPA search failed', { jobId: job.id, party, err });
        await failJob(this.opts, job.id, `DPA search failed: ${err.message}`).catch((e: unknown) => {
          if (!(e instanceof StateConflictError)) throw e;
        });
        return;
      }
      // Sent back to collecting (its data was unusable): handed back, to run again once the job is in DPA again
      // (a new task would be dropped as a repeat).
      const now = store.get(job.id);
      if (now.state === JobState.JOB_STATE_COLLECTING) throw new TaskNotReadyError(`party ${party} of job ${job.id} was sent back to collecting`);
    }
    if (store.get(job.id).parties.every((p) => p.chosen !== undefined)) await this.toMerging(job.id, signal);
  }

  private async toMerging(jobId: string, signal: AbortSignal): Promise<void> {
    try {
      await transitionJob(this.opts, jobId, JobState.JOB_STATE_MERGING, { from: JobState.JOB_STATE_DPA });
    } catch (err) {
      // Another replica moved it first (and asked for the merge).
      if (err instanceof StateConflictError) return;
      throw err;
    }
    await this.opts.merge.run(jobId, signal);
  }
}
