/**
 * Retrying calls that failed for a passing reason (server restarting, network
 * drop), with exponential backoff and jitter. Every wait is cancellable and
 * leaves neither a timer nor a listener behind.
 */
import { status as Status } from '@grpc/grpc-js';
import { DppaRpcError, isServiceError } from './errors.js';

/** How transient failures are retried. */
export interface RetryOptions {
  /**
   * How long to keep retrying, in ms, counted from the first failure of a
   * streak; an attempt that makes progress (a tensor uploaded, a chunk
   * downloaded, an event received) ends the streak. 0 disables retrying.
   * @default 300000 (5 minutes: a server restart, even with many jobs, takes seconds)
   */
  forMs: number;
  /** Attempts in a streak at most, the first included; a cap on top of `forMs`. @default Infinity */
  attempts: number;
  /** Ceiling of the wait after the first failure, in ms; doubles after each further failure. @default 250 */
  initialDelayMs: number;
  /** Largest ceiling of a wait, in ms. @default 10000 */
  maxDelayMs: number;
}

/** The defaults of {@link RetryOptions}. */
export const DEFAULT_RETRY: Readonly<RetryOptions> = Object.freeze({
  forMs: 300_000,
  attempts: Infinity,
  initialDelayMs: 250,
  maxDelayMs: 10_000,
});

/**
 * Fills in and checks retry options.
 * @throws RangeError naming the field that is wrong.
 */
export function retryWithDefaults(o: Partial<RetryOptions> | undefined): RetryOptions {
  const r: RetryOptions = { ...DEFAULT_RETRY, ...o };
  if (!(Number.isFinite(r.forMs) && r.forMs >= 0)) throw new RangeError(`retry.forMs: must be ≥ 0, got ${r.forMs}`);
  if (!(r.attempts === Infinity || Number.isInteger(r.attempts)) || r.attempts < 1) {
    throw new RangeError(`retry.attempts: must be an integer ≥ 1 or Infinity, got ${r.attempts}`);
  }
  if (!(Number.isFinite(r.initialDelayMs) && r.initialDelayMs >= 0))
    throw new RangeError(`retry.initialDelayMs: must be ≥ 0, got ${r.initialDelayMs}`);
  if (!(Number.isFinite(r.maxDelayMs) && r.maxDelayMs >= r.initialDelayMs)) {
    throw new RangeError(`retry.maxDelayMs: must be ≥ retry.initialDelayMs (${r.initialDelayMs}), got ${r.maxDelayMs}`);
  }
  return r;
}

/**
 * The wait after the `failures`-th consecutive failure (1 for the first):
 * exponential with "equal jitter" — a ceiling of `initialDelayMs · 2^(failures−1)`
 * capped at `maxDelayMs`, and a wait drawn uniformly from its upper half, so
 * that clients that failed together do not come back together, yet none
 * retries at once.
 */
export function backoffDelay(failures: number, o: RetryOptions, random: () => number = Math.random): number {
  const ceiling = Math.min(o.maxDelayMs, o.initialDelayMs * 2 ** Math.max(0, failures - 1));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/**
 * Resolves after `ms`, or rejects with the signal's reason as soon as it aborts.
 * Clears its timer and removes its listener either way.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    // Rejects with the signal's reason, whatever it is, as AbortSignal.throwIfAborted() throws it.
    if (signal?.aborted === true) {
      // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * True for failures that another attempt may not meet: the server is
 * unreachable or restarting (UNAVAILABLE), an attempt got no answer within
 * its own time limit (DEADLINE_EXCEEDED: a connection that hangs, a server
 * busy starting; a call's overall limit never reaches here, callers check
 * their scope first), or the stream was reset under the call (a dropped
 * connection, a proxy) rather than answered.
 */
export function isTransient(err: unknown): boolean {
  const e = err instanceof DppaRpcError || isServiceError(err) ? err : undefined;
  if (e === undefined) return false;
  if (e.code === Status.UNAVAILABLE || e.code === Status.DEADLINE_EXCEEDED) return true;
  // grpc-js reports a stream reset without a gRPC status as INTERNAL or CANCELLED ("Received RST_STREAM …",
  // "Call cancelled"); a call the caller cancelled never reaches here (callers check their own signal first).
  if (e.code === Status.INTERNAL && e.details.startsWith('Received RST_STREAM')) return true;
  return e.code === Status.CANCELLED && e.details === 'Call cancelled';
}

/** What a retry waits for, told to {@link BackoffHooks.onRetry} before the wait. */
export interface RetryNotice {
  /** The failure retried (a DppaRpcError naming the call, usually). */
  error: unknown;
  /** The wait before the next attempt, in ms. */
  delayMs: number;
  /** Time left of the retry budget when the wait begins, in ms. */
  leftMs: number;
  /** Failures in the current streak, this one included. */
  failures: number;
}

/** Hooks of {@link Backoff}; tests replace the clock and the dice. */
export interface BackoffHooks {
  /** Waits; @default {@link sleep} */
  sleep?: ((ms: number, signal?: AbortSignal) => Promise<void>) | undefined;
  /** Uniform in [0, 1); @default Math.random */
  random?: (() => number) | undefined;
  /** Epoch ms; @default Date.now */
  now?: (() => number) | undefined;
  /** Told before each wait. */
  onRetry?: ((notice: RetryNotice) => void) | undefined;
}

/**
 * Counts consecutive failures and waits between attempts, within the time
 * budget `forMs` counted from the first failure of the streak. `reset()`
 * after an attempt that made progress, so that a long transfer interrupted
 * several times is not given up while it advances.
 */
export class Backoff {
  private failures = 0;
  private since = 0;

  constructor(
    private readonly options: RetryOptions,
    private readonly hooks: BackoffHooks = {},
  ) {}

  /** Consecutive failures so far. */
  get failureCount(): number {
    return this.failures;
  }

  /** Forgets earlier failures. */
  reset(): void {
    this.failures = 0;
  }

  /**
   * Records a failure; waits before the next attempt, or throws `err` when
   * the budget (time or attempts) is used up. The last wait is shortened to
   * end with the budget, so that one more attempt is made at its end.
   * Throws the signal's reason if it aborts meanwhile.
   */
  async failed(err: unknown, signal?: AbortSignal): Promise<void> {
    const now = (this.hooks.now ?? Date.now)();
    if (this.failures === 0) this.since = now;
    this.failures++;
    const leftMs = this.options.forMs - (now - this.since);
    if (this.failures >= this.options.attempts || leftMs <= 0) throw err;
    const delayMs = Math.min(leftMs, backoffDelay(this.failures, this.options, this.hooks.random));
    this.hooks.onRetry?.({ error: err, delayMs, leftMs, failures: this.failures });
    await (this.hooks.sleep ?? sleep)(delayMs, signal);
  }
}

/**
 * Runs `fn` until it succeeds, retrying failures that `retryable` accepts
 * (default {@link isTransient}) within the budget of `options`.
 * @throws The last failure, or the signal's reason when aborted.
 */
export async function retrying<T>(
  fn: (attempt: number) => Promise<T>,
  options: RetryOptions,
  opts: BackoffHooks & { signal?: AbortSignal | undefined; retryable?: (err: unknown) => boolean } = {},
): Promise<T> {
  const backoff = new Backoff(options, opts);
  const retryable = opts.retryable ?? isTransient;
  for (let attempt = 1; ; attempt++) {
    opts.signal?.throwIfAborted();
    try {
      return await fn(attempt);
    } catch (err) {
      if (opts.signal?.aborted === true) throw opts.signal.reason;
      if (!retryable(err)) throw err;
      await backoff.failed(err, opts.signal);
    }
  }
}
