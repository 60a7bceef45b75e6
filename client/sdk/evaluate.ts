/**
 * The party's side of a federated DPA search (EvaluationService): build each candidate, score it locally, answer
 * with the scores only; results kept by candidate across reconnections. See docs/design/federated-evaluation.md.
 */
import { once } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { status as Status, type ClientDuplexStream, type StatusObject } from '@grpc/grpc-js';
import { CandidateKind, type EvaluationReply, type EvaluationRequest } from '../../proto/gen/dppa/v1/evaluation.js';
import { checkScores } from '../../proto/scores.js';
import { readDeltaHeader } from '../../proto/sparse/index.js';
import { applyDelta } from '../apply.js';
import { CallScope, inScope, readStream, type CallOptions } from './call.js';
import type { Connection } from './connection.js';
import { DppaRpcError, EvaluationError } from './errors.js';
import { checkHeader } from './push.js';
import { backoffDelay, isTransient, sleep } from './retry.js';

/** A candidate the server asks the party to score. */
export interface EvaluationCandidate {
  /** `dense`: the party's fine-tuned model as it is (the Domain-Ratio's reference); `amplified`: base + amplified delta. */
  kind: 'dense' | 'amplified';
  /** One factor per partition, partition 1 first; empty for `dense`. */
  factors: number[];
}

/**
 * Scores a materialised candidate on the party's validation data.
 * @param modelDir - A checkpoint folder in the base's layout (config and tokenizer files included).
 * @param signal - Aborted when the evaluation is no longer wanted (the caller gave up, or the job failed).
 * @returns Score per task, higher is better and positive (the Domain-Ratio divides by the dense model's scores),
 *   with the same task names every time.
 */
export type EvaluateFn = (
  modelDir: string,
  candidate: EvaluationCandidate,
  signal: AbortSignal,
) => Promise<Record<string, number>>;

/** What {@link DppaClient.evaluate} serves. */
export interface EvaluateOptions {
  /** Id of the job. */
  jobId: string;
  /** This party's name in the job (the token must be this party's). */
  party: string;
  /** Folder of the base checkpoint (the job's base). */
  base: string;
  /** The `.dppa` file this party uploaded (push's `keepDelta`, or the file pushed): candidates are built from it. */
  delta: string;
  /** Folder of this party's fine-tuned checkpoint, scored as the dense reference. */
  finetuned: string;
  /** Working folder, created if missing: amplified candidates are written to `workDir/candidate`, replaced for each. */
  workDir: string;
  /**
   * Scores one candidate. If it throws on every attempt ({@link EvaluateOptions.retries}), its last
   * message is sent to the server, which stops this party's search with it (the job and the other
   * parties' work are kept; calling {@link DppaClient.evaluate} again resumes the search).
   */
  evaluate: EvaluateFn;
  /** Attempts after the first when building or scoring a candidate fails. @default 2 */
  retries?: number;
}

/** Default of {@link EvaluateOptions.retries}. */
export const DEFAULT_EVALUATION_RETRIES = 2;

/** What happened, for progress displays. */
export type EvaluateEvent =
  | { type: 'connected'; attempt: number }
  | { type: 'request'; candidate: EvaluationCandidate; cached: boolean }
  | { type: 'answered'; candidate: EvaluationCandidate; scores: Record<string, number> }
  | { type: 'retrying'; candidate: EvaluationCandidate; attempt: number; error: unknown }
  | { type: 'reconnecting'; error: unknown; delayMs: number };

/** Call options of {@link DppaClient.evaluate}. */
export interface EvaluateCallOptions extends CallOptions {
  /** Told when the stream opens, each request, each answer and each reconnection. @default none */
  onProgress?: ((e: EvaluateEvent) => void) | undefined;
}

/** What {@link DppaClient.evaluate} did. */
export interface EvaluateResult {
  /** Candidates scored by the `evaluate` callback. */
  evaluated: number;
  /** Results sent; more than `evaluated` when a result was sent again after a reconnection. */
  answered: number;
}

type Answer = { scores: Record<string, number> } | { error: EvaluationError };

/**
 * Checks options.
 * @throws RangeError naming the option.
 */
function checkOptions(o: EvaluateOptions): void {
  for (const name of ['jobId', 'party', 'base', 'delta', 'finetuned', 'workDir'] as const) {
    if (typeof o[name] !== 'string' || o[name] === '') throw new RangeError(`${name}: required`);
  }
  if (typeof o.evaluate !== 'function')
    throw new RangeError('evaluate: required, a function (modelDir, candidate, signal) => scores');
  if (o.retries !== undefined && !(Number.isInteger(o.retries) && o.retries >= 0))
    throw new RangeError(`retries: expected an integer ≥ 0, got ${o.retries}`);
}

function candidateOf(req: EvaluationRequest): EvaluationCandidate {
  return {
    kind: req.kind === CandidateKind.CANDIDATE_KIND_DENSE_FINETUNED ? 'dense' : 'amplified',
    factors: [...req.factors],
  };
}

/**
 * Serves a job's evaluation requests until the party's search is over (see
 * {@link DppaClient.evaluate}).
 * @throws EvaluationError when the callback failed on every attempt (after telling the server, which stops
 *   this party's search); DppaRpcError; RangeError;
 *   DeltaMismatchError or FormatError when the delta does not fit the job; the signal's reason.
 */
export async function evaluate(
  conn: Connection,
  o: EvaluateOptions,
  call: EvaluateCallOptions = {},
): Promise<EvaluateResult> {
  checkOptions(o);
  const scope = new CallScope('Evaluate', call);
  const answers = new Map<string, Answer>();
  const result: EvaluateResult = { evaluated: 0, answered: 0 };
  const failure = (): EvaluationError | undefined =>
    [...answers.values()].find((a): a is { error: EvaluationError } => 'error' in a)?.error;
  let failures = 0;
  try {
    // A delta that cannot build the candidates would fail the whole job at its first amplified candidate: check it first.
    const job = await inScope(conn, 'GetJob', conn.jobs.getJob.bind(conn.jobs), { jobId: o.jobId }, scope, true);
    checkHeader(await readDeltaHeader(o.delta, { signal: scope.signal }), job, o.delta);
    await mkdir(o.workDir, { recursive: true });
    for (let attempt = 1; ; attempt++) {
      scope.check();
      try {
        await serveStream(conn, o, scope, attempt, call, answers, result, () => (failures = 0));
        const failed = failure();
        if (failed !== undefined) throw failed;
        return result;
      } catch (err) {
        const e = DppaRpcError.from(scope.reason(err), 'Evaluate');
        // ALREADY_EXISTS: the server has not yet seen the end of our previous stream.
        const again =
          !scope.signal.aborted && (isTransient(e) || (e instanceof DppaRpcError && e.code === Status.ALREADY_EXISTS));
        // The server ends the stream with the job's failure once it has the callback's error: that error says more.
        // After a drop, the kept error answers the repeated request instead, so that the server learns it.
        if (!again) throw scope.signal.aborted ? e : (failure() ?? e);
        // No limit on attempts: a search may wait hours for this party; the server's party timeout decides.
        const delayMs = backoffDelay(++failures, conn.options.retry);
        call.onProgress?.({ type: 'reconnecting', error: e, delayMs });
        await sleep(delayMs, scope.signal);
      }
    }
  } catch (err) {
    throw scope.reason(err);
  } finally {
    scope.dispose();
  }
}

/** One Evaluate stream: the hello, then an answer per request until the server ends the stream. */
async function serveStream(
  conn: Connection,
  o: EvaluateOptions,
  scope: CallScope,
  attempt: number,
  call: EvaluateCallOptions,
  answers: Map<string, Answer>,
  result: EvaluateResult,
  working: () => void,
): Promise<void> {
  const stream = conn.evaluations.evaluate(
    conn.metadata(),
    scope.deadline === undefined ? {} : { deadline: new Date(scope.deadline) },
  );
  // grpc-js emits a non-OK status as 'error' too, possibly before readStream below listens; 'status' and the read report it.
  stream.on('error', () => undefined);
  // An evaluation in progress stops when the caller gives up or the job fails (a final status), not when the
  // connection drops: its result is kept for the request the server repeats after the reconnection.
  const jobOver = new AbortController();
  stream.on('status', (st: StatusObject) => {
    if (st.code === Status.OK) return;
    const e = new DppaRpcError('Evaluate', st.code, st.details, { metadata: st.metadata });
    if (!isTransient(e)) jobOver.abort(e);
  });
  const signal = AbortSignal.any([scope.signal, jobOver.signal]);
  await write(stream, { hello: { jobId: o.jobId, party: o.party } }, scope.signal);
  call.onProgress?.({ type: 'connected', attempt });
  for await (const req of readStream<EvaluationRequest>(stream, scope.signal)) {
    working();
    const candidate = candidateOf(req);
    const key = `${req.kind}:${req.factors.join(',')}:${req.outsideFactor}`;
    let answer = answers.get(key);
    call.onProgress?.({ type: 'request', candidate, cached: answer !== undefined });
    if (answer === undefined) {
      answer = await scoreWithRetries(o, req, candidate, signal, (attempt, error) =>
        call.onProgress?.({ type: 'retrying', candidate, attempt, error }),
      );
      answers.set(key, answer);
      if ('scores' in answer) result.evaluated++;
    }
    const reply =
      'scores' in answer
        ? { requestId: req.requestId, scores: answer.scores, error: '' }
        : { requestId: req.requestId, scores: {}, error: answer.error.message };
    await write(stream, { result: reply }, scope.signal);
    result.answered++;
    if ('scores' in answer) call.onProgress?.({ type: 'answered', candidate, scores: answer.scores });
  }
}

/**
 * {@link score}, tried again up to `o.retries` times while it fails.
 * @param retrying - Told before each further attempt (numbered from 2) with the failure before it.
 */
async function scoreWithRetries(
  o: EvaluateOptions,
  req: EvaluationRequest,
  candidate: EvaluationCandidate,
  signal: AbortSignal,
  retrying: (attempt: number, error: EvaluationError) => void,
): Promise<Answer> {
  const attempts = 1 + (o.retries ?? DEFAULT_EVALUATION_RETRIES);
  for (let attempt = 1; ; attempt++) {
    const answer = await score(o, req, candidate, signal);
    if ('scores' in answer) return answer;
    if (attempt >= attempts) {
      if (attempts === 1) return answer;
      return {
        error: new EvaluationError(candidate, `${answer.error.message} (attempt ${attempts} of ${attempts})`, {
          cause: answer.error,
        }),
      };
    }
    retrying(attempt + 1, answer.error);
  }
}

/**
 * Builds and scores one candidate; a failure of either becomes an answer
 * carrying the error, unless `signal` aborted (then its reason is thrown).
 */
async function score(
  o: EvaluateOptions,
  req: EvaluationRequest,
  candidate: EvaluationCandidate,
  signal: AbortSignal,
): Promise<Answer> {
  try {
    let modelDir = o.finetuned;
    if (req.kind === CandidateKind.CANDIDATE_KIND_AMPLIFIED) {
      modelDir = join(o.workDir, 'candidate');
      // outside_factor 0 is the proto default of an unset field, which means 1.
      const outsideFactor = req.outsideFactor === 0 ? 1 : req.outsideFactor;
      await applyDelta({
        base: o.base,
        delta: o.delta,
        out: modelDir,
        factors: candidate.factors,
        outsideFactor,
        overwrite: true,
        signal,
      });
    } else if (req.kind !== CandidateKind.CANDIDATE_KIND_DENSE_FINETUNED) {
      throw new Error(`the server asked for a candidate of unknown kind ${req.kind}; update this client`);
    }
    return { scores: checkScores(await o.evaluate(modelDir, candidate, signal)) };
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    const what =
      candidate.kind === 'dense' ? 'the dense fine-tuned model' : `factors [${candidate.factors.join(', ')}]`;
    return {
      error: new EvaluationError(
        candidate,
        `evaluating ${what} failed: ${err instanceof Error ? err.message : String(err)}`,
        { cause: err },
      ),
    };
  }
}

/** Writes one message, waiting for 'drain' when grpc-js's buffer is full. */
async function write(
  stream: ClientDuplexStream<EvaluationReply, EvaluationRequest>,
  message: EvaluationReply,
  signal: AbortSignal,
): Promise<void> {
  if (!stream.write(message)) await once(stream, 'drain', { signal });
}
