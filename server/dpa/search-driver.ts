/**
 * The DPA step of a job as one `search` task per party, run in process
 * (backend/local.ts: every party at once, sharing the job's ONNX evaluator) or
 * on the replicas' search queue (backend/jetstream.ts). docs/design/job-flow.md.
 */
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { TaskNotReadyError, type Task, type TaskSink } from '../backend/tasks.js';
import type { JobStep } from '../jobs/job-step.js';
import { StateConflictError, transitionJob } from '../jobs/job-transitions.js';
import { openOnnx, searchPartyFactors, type JobSearchDeps } from './job-search.js';
import type { OnnxCandidates } from './onnx-candidates.js';
import { evaluatorOf } from './search-spec.js';

/** Options of {@link SearchDriver}. */
export interface SearchDriverOptions extends JobSearchDeps {
  /** Where search tasks go; set before any task runs. */
  tasks: () => TaskSink;
  /** Asked for by a queued task that finds every party's factors chosen. */
  merge: JobStep;
}

/** The DPA step and its tasks. */
export class SearchDriver implements JobStep {
  /** The ONNX evaluator of each job, shared by the searches running here. */
  private readonly evaluators = new Map<string, { onnx: Promise<OnnxCandidates>; users: number }>();

  constructor(private readonly opts: SearchDriverOptions) {}

  /**
   * Submits a search task for every party of a DPA job without chosen factors
   * whose search is not stopped, unless a queue shared by replicas holds as
   * many search tasks of the job (they will finish it). Each party's task has
   * its own id, so a queue drops one still queued.
   */
  async run(jobId: string, signal: AbortSignal): Promise<void> {
    const job = this.opts.store.get(jobId);
    const tasks = this.opts.tasks();
    const todo = job.parties.filter((p) => p.chosen === undefined && p.searchStopped !== true);
    // Not simply "any queued": a submission that failed midway left some parties without a task.
    if (todo.length === 0 || ((await tasks.queued?.(jobId, 'search')) ?? 0) >= todo.length) return;
    await tasks.submit(
      todo.map((p) => ({ task: { kind: 'search', jobId, party: p.name }, id: `${jobId}.search.${p.name}` })),
      signal,
    );
  }

  /**
   * Carries out one task taken from a queue shared by replicas: a job this
   * replica's copy shows still collecting is checked against the bucket;
   * failures are thrown as they are (the queue applies the failure policy);
   * the replica that finds every party's factors chosen moves the job to
   * MERGING and asks for the merge.
   */
  async handle(task: Task, signal: AbortSignal): Promise<void> {
    const { store } = this.opts;
    let job = store.get(task.jobId);
    // This replica's copy may lag the bucket: only a job past its search (merging or ended) drops the task.
    if (job.state === JobState.JOB_STATE_COLLECTING) job = (await store.fresh?.(task.jobId)) ?? job;
    if (job.state === JobState.JOB_STATE_COLLECTING)
      throw new TaskNotReadyError(`job ${job.id} is COLLECTING here, not yet DPA`);
    if (job.state !== JobState.JOB_STATE_DPA) return;
    const party = task.party!;
    // A failure is the queue's to settle (jobs/failure-policy.ts); a search run again resumes from what was recorded.
    await this.execute(task, signal);
    // Sent back to collecting (its data was unusable): handed back, to run again once the job is in DPA again
    // (a new task would be dropped as a repeat).
    if (store.get(job.id).state === JobState.JOB_STATE_COLLECTING)
      throw new TaskNotReadyError(`party ${party} of job ${job.id} was sent back to collecting`);
    if (store.get(job.id).parties.every((p) => p.chosen !== undefined)) await this.toMerging(job.id, signal);
  }

  /** Runs (or resumes) one party's search; failures are thrown as they are. */
  async execute(task: Task, signal: AbortSignal): Promise<void> {
    const job = this.opts.store.get(task.jobId);
    const party = task.party!;
    if (job.parties.find((p) => p.name === party)?.chosen !== undefined) return;
    await this.opts.spool.ofParty(job.id, party);
    if (evaluatorOf(job.dpa.search!, party) !== 'onnx')
      return searchPartyFactors(this.opts, job.id, party, undefined, signal);
    const onnx = this.acquire(job.id);
    // Released even when the evaluator cannot start: the job's entry must not keep a rejected evaluator.
    try {
      await searchPartyFactors(this.opts, job.id, party, await onnx, signal);
    } finally {
      await this.release(job.id);
    }
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

  /** The job's ONNX evaluator, opened by its first user. @throws SearchFailedError if it cannot start. */
  private acquire(jobId: string): Promise<OnnxCandidates> {
    let e = this.evaluators.get(jobId);
    if (e === undefined) {
      e = { onnx: openOnnx(this.opts.store.get(jobId)), users: 0 };
      this.evaluators.set(jobId, e);
    }
    e.users++;
    return e.onnx;
  }

  /** Closes the job's ONNX evaluator once its last user is done. */
  private async release(jobId: string): Promise<void> {
    const e = this.evaluators.get(jobId);
    if (e === undefined || --e.users > 0) return;
    this.evaluators.delete(jobId);
    await (await e.onnx.catch(() => undefined))?.close();
  }
}
