/**
 * EvaluationService: the stream over which a party scores the candidates of its DPA search on its own machine.
 * See docs/design/federated-evaluation.md.
 */
import type {
  EvaluationReply,
  EvaluationRequest,
  EvaluationServiceServer,
} from '../../proto/gen/dppa/v1/evaluation.js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import type { RemoteEvaluators } from '../dpa/remote-evaluators.js';
import { evaluatorOf } from '../dpa/search-spec.js';
import { FailedPreconditionError, InvalidArgumentError } from '../errors.js';
import type { JobStore, StoredJob } from '../jobs/job-store.js';
import type { Authenticator } from './auth.js';
import type { CallContext, RpcWrapper, Send } from './handler.js';

/** What the evaluation service needs. */
export interface EvaluationServiceDeps {
  store: JobStore;
  broker: RemoteEvaluators;
  auth: Authenticator;
  /** Resumes the search of a party that rejoins after its search stopped (jobs/job-runner.ts). */
  runner: { rejoin(jobId: string, party: string): Promise<void> };
}

/** The EvaluationService implementation. */
export function evaluationService(deps: EvaluationServiceDeps, rpc: RpcWrapper): EvaluationServiceServer {
  // Endless: a party may wait for requests for as long as the other parties upload; a graceful stop ends it at once.
  return {
    evaluate: rpc.bidiStream(
      'dppa.v1.EvaluationService/Evaluate',
      (requests, send, ctx) => serve(deps, requests, send, ctx),
      true,
    ),
  };
}

async function serve(
  deps: EvaluationServiceDeps,
  requests: AsyncIterable<EvaluationReply>,
  send: Send<EvaluationRequest>,
  ctx: CallContext,
): Promise<void> {
  const messages = requests[Symbol.asyncIterator]();
  const first = await until(messages.next(), ctx.signal);
  const hello = first.done === true ? undefined : first.value.hello;
  if (hello === undefined)
    throw new InvalidArgumentError('the first message of an evaluation stream must be an EvaluationHello');
  deps.auth.requireParty(ctx.metadata, hello.jobId, hello.party);
  if (!hasWork(deps.store.get(hello.jobId), hello.party)) return;

  // Aborted by the broker when the party's search is over (no error) or its job failed (endError).
  const ended = new AbortController();
  let endError: Error | undefined;
  const connection = deps.broker.connect(hello.jobId, hello.party, {
    // A send fails only when the call is going away; the broker sends the request again on the next stream.
    send: (request) => void send(request).catch(() => undefined),
    end: (error) => {
      endError = error;
      ended.abort();
    },
  });
  try {
    // Connected first, so that the resumed search's first request finds the stream.
    await deps.runner.rejoin(hello.jobId, hello.party);
    const stop = AbortSignal.any([ctx.signal, ended.signal]);
    for (;;) {
      const next = await until(messages.next(), stop);
      if (next.done === true) return;
      const { hello: again, result } = next.value;
      if (again !== undefined) throw new InvalidArgumentError('EvaluationHello must be the first message only');
      if (result === undefined)
        throw new InvalidArgumentError('every message after the hello must carry an EvaluationResult');
      connection.deliver(result);
    }
  } catch (err) {
    if (!ended.signal.aborted || ctx.signal.aborted) throw err;
    if (endError !== undefined) throw endError;
  } finally {
    connection.disconnect();
  }
}

/**
 * Whether the party may still be asked for evaluations: false when its search
 * is over (the stream then ends at once, with OK).
 * @throws FailedPreconditionError when the job does not use the party's evaluations, or failed.
 */
function hasWork(job: StoredJob, party: string): boolean {
  const search = job.dpa.search;
  if (search === undefined)
    throw new FailedPreconditionError(`job ${job.id} does not search its factors: there is nothing to evaluate`);
  if (evaluatorOf(search, party) !== 'remote') {
    throw new FailedPreconditionError(
      `the candidates of party ${party} of job ${job.id} are evaluated on the server (ONNX): there is nothing to evaluate`,
    );
  }
  if (job.state === JobState.JOB_STATE_FAILED)
    throw new FailedPreconditionError(`job ${job.id} failed: ${job.failureReason}`);
  const searched = job.parties.find((p) => p.name === party)?.chosen !== undefined;
  return !searched && (job.state === JobState.JOB_STATE_COLLECTING || job.state === JobState.JOB_STATE_DPA);
}

/**
 * `p`, or the signal's reason as soon as it aborts. `p` is still handled
 * afterwards: a read left pending settles when the call goes away.
 */
function until<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    if (signal.aborted) onAbort();
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (err: Error) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}
