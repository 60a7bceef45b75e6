/**
 * The broker between the DPA searches and the parties' evaluation streams: one outstanding request per party, kept
 * across reconnections and timed out by `party_timeout_seconds`. See docs/design/federated-evaluation.md.
 */
import { randomBytes } from 'node:crypto';
import { CandidateKind, type EvaluationRequest, type EvaluationResult } from '../../proto/gen/dppa/v1/evaluation.js';
import { checkScores, ScoresError } from '../../proto/scores.js';
import { AlreadyExistsError, InvalidArgumentError } from '../errors.js';

/** Score per task. */
export type Scores = Record<string, number>;

/** A candidate a search wants scored. */
export interface Candidate {
  /** The dense fine-tuned model (the reference), or base + amplified delta. */
  kind: 'dense' | 'amplified';
  /** One factor per partition, partition 1 first; empty for the dense reference. */
  factors: number[];
  /** Factor of the outside tensors (partition 0). */
  outsideFactor: number;
}

/** Options of {@link RemoteEvaluators.request}. */
export interface RequestOptions {
  /** How long the request may wait for the party while it is not connected, in seconds. */
  timeoutSeconds: number;
  /** Task names the scores must have (the dense reference's); undefined for the dense reference itself. */
  tasks: readonly string[] | undefined;
  /** Withdraws the request; it then rejects with the signal's reason. */
  signal: AbortSignal;
}

/** A party's open stream, as the broker drives it (implemented by rpc/evaluation-service.ts). */
export interface EvaluatorStream {
  /** Sends a request to the party; a failed send ends the stream, and the request is sent again on reconnection. */
  send(request: EvaluationRequest): void;
  /** Ends the stream: without an error when the party's search is over, with one when its job failed. */
  end(error?: Error): void;
}

/** What {@link RemoteEvaluators.connect} gives the stream. */
export interface Connection {
  /**
   * Hands over a result from the party.
   * @throws InvalidArgumentError when it answers no outstanding request or its scores are unusable
   *   (the request stays outstanding).
   */
  deliver(result: EvaluationResult): void;
  /** The stream ended; an outstanding request waits for the party's next stream. */
  disconnect(): void;
}

/** The party did not (re)connect while a request waited for it. */
export class PartyTimeoutError extends Error {
  override name = 'PartyTimeoutError';
}

/** Longest part of a party's evaluation error kept (its start and its end, where the command's last stderr lines are). */
const MAX_EVALUATION_ERROR_CHARS = 4000;

/** The party answered a request with an error instead of scores. */
export class PartyEvaluationError extends Error {
  override name = 'PartyEvaluationError';
  /** The party's error, cut to {@link MAX_EVALUATION_ERROR_CHARS} (its middle left out). */
  readonly evaluationError: string;
  constructor(party: string, error: string) {
    const half = MAX_EVALUATION_ERROR_CHARS / 2;
    const kept = error.length <= MAX_EVALUATION_ERROR_CHARS ? error : `${error.slice(0, half)} … ${error.slice(-half)}`;
    super(`party ${party} could not evaluate its candidate: ${kept}`);
    this.evaluationError = kept;
  }
}

interface Pending {
  request: EvaluationRequest;
  tasks: readonly string[] | undefined;
  timeoutSeconds: number;
  resolve: (scores: Scores) => void;
  reject: (err: Error) => void;
}

interface PartyState {
  stream: EvaluatorStream | undefined;
  pending: Pending | undefined;
  timer: NodeJS.Timeout | undefined;
  /** A stream of this party was open at some time since the server started. */
  connectedOnce: boolean;
}

/** Requests and streams of every party of every job; one instance per server. */
export class RemoteEvaluators {
  private readonly parties = new Map<string, PartyState>();

  /** Number of open streams (tests check that none leak). */
  get streamCount(): number {
    let n = 0;
    for (const s of this.parties.values()) if (s.stream !== undefined) n++;
    return n;
  }

  /**
   * Asks party `party` of job `jobId` to score a candidate; waits for its
   * stream if none is open.
   * @returns The scores, checked: finite, at least one task, and the tasks of `opts.tasks` when given.
   * @throws PartyTimeoutError when the party is not connected for `opts.timeoutSeconds` while the request waits;
   *   PartyEvaluationError when it answers with an error; the signal's reason when aborted.
   */
  request(jobId: string, party: string, candidate: Candidate, opts: RequestOptions): Promise<Scores> {
    const state = this.state(jobId, party);
    if (state.pending !== undefined)
      return Promise.reject(new Error(`party ${party} of job ${jobId} already has a request outstanding`));
    if (opts.signal.aborted) return Promise.reject(opts.signal.reason as Error);
    return new Promise<Scores>((resolve, reject) => {
      const onAbort = (): void => settle(() => reject(opts.signal.reason as Error));
      const settle = (then: () => void): void => {
        opts.signal.removeEventListener('abort', onAbort);
        clearTimeout(state.timer);
        state.timer = undefined;
        state.pending = undefined;
        then();
      };
      opts.signal.addEventListener('abort', onAbort, { once: true });
      state.pending = {
        request: {
          requestId: randomBytes(9).toString('base64url'),
          kind:
            candidate.kind === 'dense'
              ? CandidateKind.CANDIDATE_KIND_DENSE_FINETUNED
              : CandidateKind.CANDIDATE_KIND_AMPLIFIED,
          factors: candidate.factors,
          outsideFactor: candidate.outsideFactor,
        },
        tasks: opts.tasks,
        timeoutSeconds: opts.timeoutSeconds,
        resolve: (scores) => settle(() => resolve(scores)),
        reject: (err) => settle(() => reject(err)),
      };
      if (state.stream !== undefined) state.stream.send(state.pending.request);
      else this.startTimer(party, state);
    });
  }

  /**
   * Opens the stream of a party: an outstanding request is sent to it at once.
   * @throws AlreadyExistsError when the party already has a stream open.
   */
  connect(jobId: string, party: string, stream: EvaluatorStream): Connection {
    const state = this.state(jobId, party);
    if (state.stream !== undefined) {
      throw new AlreadyExistsError(
        `party ${party} of job ${jobId} already has an evaluation stream open (one at a time); retry once it ended`,
      );
    }
    state.stream = stream;
    state.connectedOnce = true;
    clearTimeout(state.timer);
    state.timer = undefined;
    if (state.pending !== undefined) stream.send(state.pending.request);
    return {
      deliver: (result) => this.deliver(party, state, result),
      disconnect: () => {
        if (state.stream !== stream) return;
        state.stream = undefined;
        if (state.pending !== undefined) this.startTimer(party, state);
      },
    };
  }

  /**
   * A party's search is over: ends its stream (with `error` when the job
   * failed) and forgets the party.
   */
  endParty(jobId: string, party: string, error?: Error): void {
    const k = key(jobId, party);
    const state = this.parties.get(k);
    if (state === undefined) return;
    this.parties.delete(k);
    clearTimeout(state.timer);
    state.pending?.reject(error ?? new Error(`the search of party ${party} ended`));
    state.stream?.end(error);
  }

  /** Ends the streams of every party of a job (see {@link endParty}). */
  endJob(jobId: string, error?: Error): void {
    for (const k of [...this.parties.keys()]) {
      if (k.startsWith(`${jobId}/`)) this.endParty(jobId, k.slice(jobId.length + 1), error);
    }
  }

  private state(jobId: string, party: string): PartyState {
    const k = key(jobId, party);
    let s = this.parties.get(k);
    if (s === undefined) {
      s = { stream: undefined, pending: undefined, timer: undefined, connectedOnce: false };
      this.parties.set(k, s);
    }
    return s;
  }

  private startTimer(party: string, state: PartyState): void {
    const pending = state.pending!;
    const again = state.connectedOnce ? 'reconnect' : 'connect';
    state.timer = setTimeout(() => {
      pending.reject(
        new PartyTimeoutError(
          `party ${party} did not ${again} within ${pending.timeoutSeconds} s to answer its evaluation request`,
        ),
      );
    }, pending.timeoutSeconds * 1000);
  }

  private deliver(party: string, state: PartyState, result: EvaluationResult): void {
    const p = state.pending;
    if (p === undefined || p.request.requestId !== result.requestId) {
      throw new InvalidArgumentError(
        `result for request_id ${JSON.stringify(result.requestId)}, which is not outstanding (${p === undefined ? 'none is' : `${JSON.stringify(p.request.requestId)} is`})`,
      );
    }
    if (result.error !== '') {
      p.reject(new PartyEvaluationError(party, result.error));
      return;
    }
    p.resolve(usableScores(result.scores, p.tasks));
  }
}

/**
 * Checks a party's scores.
 * @throws InvalidArgumentError saying what is wrong.
 */
function usableScores(reported: Readonly<Record<string, number>>, tasks: readonly string[] | undefined): Scores {
  let scores: Scores;
  try {
    scores = checkScores(reported);
  } catch (err) {
    if (err instanceof ScoresError) throw new InvalidArgumentError(`scores: ${err.message}`, { cause: err });
    throw err;
  }
  if (tasks !== undefined) {
    const names = Object.keys(scores).sort();
    const expected = [...tasks].sort();
    if (expected.join('\n') !== names.join('\n')) {
      throw new InvalidArgumentError(
        `scores: tasks ${JSON.stringify(names)} differ from those of the dense reference, ${JSON.stringify(expected)}`,
      );
    }
  }
  return scores;
}

function key(jobId: string, party: string): string {
  return `${jobId}/${party}`;
}
