/**
 * Stopping one party's work instead of failing its job: a damaged spooled tensor sends the party back to
 * collecting, failing evaluations stop its search; other parties' work is kept. See docs/design/jobs.md.
 */
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import type { SpooledTensorError } from '../merge/tensor-merge.js';
import type { Spool } from '../uploads/spool.js';
import type { StoredJob } from './job-store.js';
import { StateConflictError, transitionJob, type TransitionDeps } from './job-transitions.js';

/** What a party stop needs. */
export interface PartyStopDeps extends TransitionDeps {
  spool: Spool;
}

/**
 * Sends the party of an unusable spooled tensor back to collecting: the
 * tensor is dropped, the job moves from `from` to COLLECTING with the party's
 * reason, `party_stopped` is announced.
 * @returns False, doing nothing more, when the job is no longer in `from` (another replica or task sent it back first, or it ended).
 */
export async function sendPartyBack(
  deps: PartyStopDeps,
  jobId: string,
  from: JobState,
  err: SpooledTensorError,
): Promise<boolean> {
  const reason = `tensor "${err.tensorName}" of its upload cannot be used (${err.reason}); it was discarded: push again to send it`;
  // Already sent back: the tensor may have been pushed again since, and must stay.
  if (((await deps.store.fresh?.(jobId)) ?? deps.store.get(jobId)).state !== from) return false;
  await deps.spool.party(jobId, err.party).drop([err.tensorName]);
  try {
    await transitionJob(deps, jobId, JobState.JOB_STATE_COLLECTING, {
      from,
      change: (j) => (partyOf(j, err.party).stoppedReason = reason),
    });
  } catch (e) {
    if (e instanceof StateConflictError) return false;
    throw e;
  }
  await deps.events.append(jobId, { partyStopped: { party: err.party, reason, discardedTensors: [err.tensorName] } });
  deps.log.warn('party sent back to collecting', { jobId, party: err.party, tensor: err.tensorName, err: err.message });
  return true;
}

/**
 * Stops a party's factor search (its evaluations keep failing): the job
 * stays in DPA and waits for the party to rejoin.
 * @returns The reason recorded.
 */
export async function stopPartySearch(
  deps: TransitionDeps,
  jobId: string,
  party: string,
  why: string,
): Promise<string> {
  const reason = `its evaluation failed: ${why}; its search stopped: run dppa evaluate again to resume it`;
  await deps.store.update(jobId, (j) => {
    const p = partyOf(j, party);
    p.stoppedReason = reason;
    p.searchStopped = true;
  });
  await deps.events.append(jobId, { partyStopped: { party, reason, discardedTensors: [] } });
  deps.log.warn('party search stopped', { jobId, party, reason: why });
  return reason;
}

/**
 * Clears a party's stop, when it rejoins its search.
 * @returns True if it was stopped.
 */
export async function resumeParty(deps: TransitionDeps, jobId: string, party: string): Promise<boolean> {
  if (partyOf(deps.store.get(jobId), party).searchStopped !== true) return false;
  await deps.store.update(jobId, (j) => {
    const p = partyOf(j, party);
    delete p.stoppedReason;
    delete p.searchStopped;
  });
  deps.log.info('party resumes its search', { jobId, party });
  return true;
}

/** Clears the reasons of parties sent back to collecting: the job moves on with every upload in. */
export function clearSentBack(job: StoredJob): void {
  for (const p of job.parties) if (p.searchStopped !== true) delete p.stoppedReason;
}

function partyOf(job: StoredJob, party: string): StoredJob['parties'][number] {
  const p = job.parties.find((x) => x.name === party);
  if (p === undefined) throw new Error(`job ${job.id} has no party ${party}`);
  return p;
}
