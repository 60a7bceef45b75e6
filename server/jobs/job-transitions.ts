/**
 * Moving a job from one state to another, the one way the runner and the
 * cluster's merge tasks do it: checked against the state it is in (so that,
 * with replicas, only one of two concurrent moves wins), recorded, announced.
 */
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { FailedPreconditionError } from '../errors.js';
import type { Logger } from '../log.js';
import type { JobEvents } from './job-events.js';
import { isTerminal, stateName, type JobStore, type StoredJob } from './job-store.js';

/** The job is not in the state a transition expected: it ended, or another replica moved it first. */
export class StateConflictError extends FailedPreconditionError {
  override name = 'StateConflictError';
}

/** What a transition needs. */
export interface TransitionDeps {
  store: JobStore;
  events: JobEvents;
  log: Logger;
}

/** Options of {@link transitionJob}. */
export interface TransitionOptions {
  /** The state the job must be in; any state but MERGED and FAILED when absent. */
  from?: JobState;
  /** More changes made in the same write. */
  change?: (job: StoredJob) => void;
}

/**
 * Changes a job's state, records it and announces it (`state_changed`).
 * @throws StateConflictError if the job has ended or is not in `opts.from`.
 */
export async function transitionJob(
  deps: TransitionDeps,
  jobId: string,
  to: JobState,
  opts: TransitionOptions = {},
): Promise<StoredJob> {
  let from = JobState.JOB_STATE_UNSPECIFIED;
  const job = await deps.store.update(jobId, (j) => {
    if (isTerminal(j.state) || (opts.from !== undefined && j.state !== opts.from)) {
      throw new StateConflictError(
        `job ${jobId} is ${stateName(j.state)}, not ${opts.from === undefined ? 'active' : stateName(opts.from)}`,
      );
    }
    from = j.state;
    j.state = to;
    opts.change?.(j);
  });
  await deps.events.append(jobId, { stateChanged: { from, to } });
  deps.log.info('job state changed', { jobId, from: stateName(from), to: stateName(to) });
  return job;
}

/**
 * Fails a job that has not ended, with its reason (`state_changed`, then `failed`).
 * @param from - The state the job must be in (a step's failure: the step's state); any active one when absent.
 * @throws StateConflictError if it has ended or is not in `from`.
 */
export async function failJob(
  deps: TransitionDeps,
  jobId: string,
  reason: string,
  from?: JobState,
): Promise<StoredJob> {
  const job = await transitionJob(deps, jobId, JobState.JOB_STATE_FAILED, {
    change: (j) => (j.failureReason = reason),
    ...(from === undefined ? {} : { from }),
  });
  await deps.events.append(jobId, { failed: { reason } });
  return job;
}
