/**
 * The one failure policy of the job flow: what a failed search or merge (or one of their tasks) does to
 * its job, on either backend. docs/design/job-flow.md, "One failure policy".
 */
import { FormatError, messageOf } from '../../proto/errors.js';
import { SearchFailedError } from '../dpa/job-search.js';
import { PartyTimeoutError } from '../dpa/remote-evaluators.js';
import { type DiskFullError, storageError, type StorageUnavailableError } from '../errors.js';
import { MissingPieceError } from '../merge/patch-output.js';
import { SpooledTensorError } from '../merge/tensor-merge.js';

/** Default number of runs of a task whose failure may pass before its job fails (`--task-attempts`). */
export const DEFAULT_TASK_ATTEMPTS = 5;

/** First wait before a failed task runs again; doubles after each run, up to {@link MAX_RETRY_DELAY_MS}. */
const RETRY_DELAY_MS = 1000;
const MAX_RETRY_DELAY_MS = 30_000;

/** The step of a job a failure belongs to. */
export type StepName = 'merge' | 'DPA search' | 'secure aggregation';

/**
 * What kind of failure an error is:
 * - `storage`: a full disk or a failing device; the job pauses and is tried again once it may pass.
 * - `party`: one party's spooled data is unusable; that party is sent back to collecting.
 * - `permanent`: damaged or mismatched input, a search that cannot succeed, a merged-patch piece still unusable
 *   after its tensor was merged again; every attempt would fail alike.
 * - `transient`: the backend says it may pass (NATS away). A task runs again a bounded number of times, but a
 *   job is never failed for it: its verdict is to wait (failing a job needs the backend that is away).
 * - `unexpected`: anything else; a task is run again (here or on another replica), a bounded number of times.
 */
export type FailureKind = 'storage' | 'party' | 'permanent' | 'transient' | 'unexpected';

/** What the job flow does about a step's failure. */
export type Verdict =
  | { action: 'pause'; storage: DiskFullError | StorageUnavailableError }
  | { action: 'send-back'; err: SpooledTensorError }
  /** Left as it is: the task comes back, or the queueing is tried again (the runner's sweep). */
  | { action: 'wait'; reason: string }
  | { action: 'fail'; reason: string };

/** A task failed on every run it was allowed; its last failure is the cause. */
export class AttemptsExhaustedError extends Error {
  override name = 'AttemptsExhaustedError';

  constructor(
    readonly attempts: number,
    cause: unknown,
  ) {
    super(`after ${attempts} ${attempts === 1 ? 'attempt' : 'attempts'}: ${messageOf(cause)}`, { cause });
  }
}

/** Options of {@link FailurePolicy}. */
export interface FailurePolicyOptions {
  /** Runs of a task whose failure may pass, the first included. @default DEFAULT_TASK_ATTEMPTS */
  taskAttempts?: number;
  /** Whether the backend expects `err` to pass (e.g. NATS away); looked for along the cause chain. */
  transient?: (err: unknown) => boolean;
}

/** The failure policy; one per server, shared by its backend's task queues and its job runner. */
export class FailurePolicy {
  readonly taskAttempts: number;
  private readonly transient: (err: unknown) => boolean;

  constructor(opts: FailurePolicyOptions = {}) {
    this.taskAttempts = opts.taskAttempts ?? DEFAULT_TASK_ATTEMPTS;
    this.transient = opts.transient ?? (() => false);
  }

  /**
   * The kind of `err` (see {@link FailureKind}); the first matching rule wins, in the order of the kinds.
   * A {@link SearchFailedError} is of its cause's kind, but permanent without a cause, or for a party's
   * timeout, damaged input or a search the algorithm rejects (a RangeError: e.g. every dense score 0).
   */
  kind(err: unknown): FailureKind {
    if (storageError(err) !== undefined) return 'storage';
    if (err instanceof SpooledTensorError) return 'party';
    for (let e: unknown = err, depth = 0; depth < 8; depth++) {
      if (this.transient(e)) return 'transient';
      if (!(e instanceof Error) || e.cause === undefined) break;
      e = e.cause;
    }
    if (err instanceof FormatError || err instanceof AttemptsExhaustedError || err instanceof MissingPieceError)
      return 'permanent';
    if (err instanceof SearchFailedError) {
      const { cause } = err;
      const permanent = [PartyTimeoutError, FormatError, RangeError].some((c) => cause instanceof c);
      if (cause === undefined || permanent) return 'permanent';
      return this.kind(cause);
    }
    return 'unexpected';
  }

  /** Whether a task that failed with `err` on its `attempt`-th run (1: the first) runs again. */
  retries(err: unknown, attempt: number): boolean {
    const k = this.kind(err);
    return (k === 'transient' || k === 'unexpected') && attempt < this.taskAttempts;
  }

  /** How long a task that failed on its `attempt`-th run waits before its next one. */
  retryDelayMs(attempt: number): number {
    return Math.min(MAX_RETRY_DELAY_MS, RETRY_DELAY_MS * 2 ** Math.max(0, attempt - 1));
  }

  /** The error a task's failure leaves to its job once {@link retries} says no. */
  final(err: unknown, attempt: number): unknown {
    const k = this.kind(err);
    return k === 'transient' || k === 'unexpected' ? new AttemptsExhaustedError(attempt, err) : err;
  }

  /**
   * What a failure of `step` (a task's {@link final} error, or the step's own) does to its job.
   * A transient failure that reached here (the queueing of tasks, or a task out of runs while NATS is away) waits:
   * failing the job would need the backend that is away; the task or the runner's sweep tries again.
   */
  verdict(step: StepName, err: unknown): Verdict {
    switch (this.kind(err)) {
      case 'storage':
        return { action: 'pause', storage: storageError(err)! };
      case 'party':
        return { action: 'send-back', err: err as SpooledTensorError };
      case 'transient':
        return { action: 'wait', reason: messageOf(err) };
      default:
        return { action: 'fail', reason: `${step} failed${failureText(err)}` };
    }
  }
}

/** " after N attempts: …" or ": …". */
function failureText(err: unknown): string {
  return err instanceof AttemptsExhaustedError ? ` ${err.message}` : `: ${messageOf(err)}`;
}
