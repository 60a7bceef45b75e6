/**
 * The factor search of one party of a job in DPA (spec "DPA"; docs/dpa.md);
 * search-driver.ts runs one per party, as tasks.
 *
 * Each party's search first measures the dense fine-tuned model's scores (the
 * reference of its Domain-Ratio), then runs `searchFactors` over the partitions
 * of its delta with score = Domain-Ratio of the candidate. Every evaluation is
 * appended to the job and written to `job.json` before the search goes on, then
 * announced (`evaluation_done`) and counted. A search that starts again (after
 * a restart) runs from the beginning with the recorded evaluations answering
 * the candidates they cover (`memoised`): the search is deterministic, so it
 * asks for the same candidates and none is evaluated twice. The chosen factors
 * go to the party's status with a `factors_chosen` event.
 */
import { JobState, type Evaluation } from '../../proto/gen/dppa/v1/jobs.js';
import { FailedPreconditionError } from '../errors.js';
import type { JobEvents } from '../jobs/job-events.js';
import { sendPartyBack, stopPartySearch } from '../jobs/party-stops.js';
import type { JobStore, StoredJob } from '../jobs/job-store.js';
import type { Logger } from '../log.js';
import { SpooledTensorError } from '../merge/tensor-merge.js';
import type { Metrics } from '../metrics.js';
import type { Spool } from '../uploads/spool.js';
import { domainRatio, factorKey, memoised, searchFactors, searchOptions } from '../../proto/algorithm/index.js';
import { OnnxCandidates } from './onnx-candidates.js';
import {
  PartyEvaluationError,
  PartyTimeoutError,
  type Candidate,
  type RemoteEvaluators,
  type Scores,
} from './remote-evaluators.js';
import { evaluatorOf, partyTimeoutSeconds, type EvaluatorName } from './search-spec.js';

/** What the searches of a job need. */
export interface JobSearchDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  metrics: Metrics;
  log: Logger;
  /** Requests to the parties whose evaluator is remote. */
  broker: RemoteEvaluators;
}

/** A search failed for a reason that fails the job; the message says which party and why. */
export class SearchFailedError extends Error {
  override name = 'SearchFailedError';
}

/**
 * Runs (or resumes, from its recorded evaluations) the search of one party
 * of a job in state DPA, with the job's ONNX evaluator if the party uses it.
 * A party whose evaluations failed has its search stopped, a party whose
 * spooled data is unusable is sent back to collecting (jobs/party-stops.ts):
 * the job goes on without it.
 * @throws SearchFailedError (the job fails with its message; its cause says why); the signal's reason when aborted.
 */
export async function searchPartyFactors(
  deps: JobSearchDeps,
  jobId: string,
  party: string,
  onnx: OnnxCandidates | undefined,
  signal: AbortSignal,
): Promise<void> {
  const job = deps.store.get(jobId);
  try {
    await searchParty(deps, job, party, onnx, signal);
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    let stopped: boolean;
    try {
      stopped = await stopParty(deps, jobId, party, err);
    } catch (stopErr) {
      throw failure(party, stopErr);
    }
    if (!stopped) throw failure(party, err);
  }
}

/**
 * Stops one party's work when its search failed because of that party alone:
 * its evaluations failed (its search stops, its stream ends with the reason),
 * or its spooled data is unusable (it goes back to collecting).
 * @returns False when the failure is not one party's: the job fails.
 */
async function stopParty(deps: JobSearchDeps, jobId: string, party: string, err: unknown): Promise<boolean> {
  if (err instanceof PartyEvaluationError) {
    const reason = await stopPartySearch(deps, jobId, party, err.evaluationError);
    deps.broker.endParty(
      jobId,
      party,
      new FailedPreconditionError(`the search of party ${party} of job ${jobId} stopped: ${reason}`),
    );
    return true;
  }
  if (err instanceof SpooledTensorError) {
    await sendPartyBack(deps, jobId, JobState.JOB_STATE_DPA, err);
    return true;
  }
  return false;
}

/**
 * The job's ONNX evaluator, opened.
 * @throws SearchFailedError if it cannot start.
 */
export async function openOnnx(job: StoredJob): Promise<OnnxCandidates> {
  try {
    return await OnnxCandidates.open(job, job.dpa.search!);
  } catch (err) {
    throw new SearchFailedError(
      `the ONNX evaluator cannot start: ${err instanceof Error ? err.message : String(err)}`,
      { cause: err },
    );
  }
}

function failure(party: string, err: unknown): SearchFailedError {
  if (err instanceof SearchFailedError) return err;
  // These already name the party.
  if (err instanceof PartyTimeoutError || err instanceof PartyEvaluationError)
    return new SearchFailedError(err.message, { cause: err });
  return new SearchFailedError(`party ${party}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}

async function searchParty(
  deps: JobSearchDeps,
  job: StoredJob,
  party: string,
  onnx: OnnxCandidates | undefined,
  signal: AbortSignal,
): Promise<void> {
  const { store, events, metrics, log, broker } = deps;
  const search = job.dpa.search!;
  const spool = deps.spool.party(job.id, party);
  const partitions = spool.header!.levels.length;
  const evaluator: EvaluatorName = evaluatorOf(search, party);
  const evaluate = async (candidate: Candidate, tasks: readonly string[] | undefined): Promise<Scores> => {
    const done = metrics.dpaEvaluationDuration.startTimer({ evaluator });
    let scores: Scores;
    try {
      scores =
        evaluator === 'remote'
          ? await broker.request(job.id, party, candidate, {
              timeoutSeconds: partyTimeoutSeconds(search),
              tasks,
              signal,
            })
          : await onnx!.score(party, spool, candidate, signal);
    } catch (err) {
      // A stop or another party's failure is no failure of this evaluation.
      if (!signal.aborted) metrics.dpaEvaluationFailures.inc({ evaluator });
      throw err;
    }
    done();
    return scores;
  };
  const record = async (e: Omit<Evaluation, 'party' | 'seq'>): Promise<void> => {
    let evaluation: Evaluation | undefined;
    await store.update(job.id, (j) => {
      evaluation = { party, seq: j.evaluations.filter((x) => x.party === party).length + 1, ...e };
      j.evaluations.push(evaluation);
    });
    metrics.dpaEvaluations.inc({ evaluator });
    await events.append(job.id, { evaluationDone: { evaluation: evaluation! } });
  };
  const recorded = (): Evaluation[] => store.get(job.id).evaluations.filter((e) => e.party === party);

  let dense = recorded().find((e) => e.denseReference)?.scores;
  if (dense === undefined) {
    const scores = await evaluate({ kind: 'dense', factors: [], outsideFactor: 1 }, undefined);
    // Fails here, before any candidate, when no task can give a ratio (every dense score 0).
    const ratio = domainRatio(scores, scores);
    await record({ denseReference: true, factors: [], scores, domainRatio: ratio });
    dense = scores;
  }
  const reference = dense;
  const tasks = Object.keys(reference);
  const known = new Map(
    recorded()
      .filter((e) => !e.denseReference)
      .map((e) => [factorKey(e.factors), e.domainRatio]),
  );
  const score = memoised(
    known,
    async (factors) => {
      const outsideFactor = job.dpa.scaleOutsideByMax ? Math.max(...factors) : 1;
      const scores = await evaluate({ kind: 'amplified', factors, outsideFactor }, tasks);
      const ratio = domainRatio(scores, reference);
      metrics.dpaDomainRatio.observe({ evaluator }, ratio);
      // Recorded here rather than through memoised's callback, which sees the ratio but not the per-task scores.
      await record({ denseReference: false, factors, scores, domainRatio: ratio });
      return ratio;
    },
    () => undefined,
  );
  const result = await searchFactors(searchOptions(search, partitions), score, signal);
  await store.update(job.id, (j) => {
    j.parties.find((p) => p.name === party)!.chosen = { factors: result.factors, domainRatio: result.score };
  });
  await events.append(job.id, { factorsChosen: { party, factors: result.factors, domainRatio: result.score } });
  broker.endParty(job.id, party);
  log.info('factors chosen', {
    jobId: job.id,
    party,
    factors: result.factors,
    domainRatio: result.score,
    evaluations: recorded().length,
  });
}
