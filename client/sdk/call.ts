/**
 * Per-call plumbing: the caller's signal and time limit linked into one
 * AbortSignal, unary calls with retries, and server streams read as async
 * generators that cancel their call when the reader stops.
 */
import {
  status as Status,
  type CallOptions as GrpcCallOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type Metadata,
  type ServiceError,
} from '@grpc/grpc-js';
import type { Connection } from './connection.js';
import { DppaRpcError } from './errors.js';
import { retrying } from './retry.js';

/** Options every SDK call takes. */
export interface CallOptions {
  /** Cancels the call; it then rejects with the signal's reason. @default none */
  signal?: AbortSignal | undefined;
  /**
   * Time limit of the whole call, retries included, in ms; when it passes the
   * call rejects with a DppaRpcError of code DEADLINE_EXCEEDED.
   * @default none: each attempt of a request has the client's `timeoutMs`, and
   *   retrying ends with the client's `retry.forMs`
   */
  timeoutMs?: number | undefined;
}

/**
 * The caller's signal and time limit as one AbortSignal, whose reason says
 * which fired. `dispose()` clears the timer and the listener. @internal
 */
export class CallScope {
  readonly signal: AbortSignal;
  /** Epoch ms after which the call is over, if it has a limit. */
  readonly deadline: number | undefined;
  private readonly timer: NodeJS.Timeout | undefined;
  private readonly unlink: () => void;

  constructor(method: string, opts: CallOptions) {
    const controller = new AbortController();
    this.signal = controller.signal;
    const outer = opts.signal;
    if (outer?.aborted === true) controller.abort(outer.reason);
    const onAbort = (): void => controller.abort(outer!.reason);
    outer?.addEventListener('abort', onAbort, { once: true });
    this.unlink = () => outer?.removeEventListener('abort', onAbort);
    const ms = opts.timeoutMs;
    if (ms !== undefined) {
      if (!(Number.isFinite(ms) && ms > 0)) throw new RangeError(`timeoutMs: must be a positive number, got ${ms}`);
      this.deadline = Date.now() + ms;
      this.timer = setTimeout(
        () =>
          controller.abort(
            new DppaRpcError(method, Status.DEADLINE_EXCEEDED, `no result within the time limit of ${ms} ms`),
          ),
        ms,
      );
    }
  }

  /** Throws the reason (caller's abort, or the deadline) if the call is over. */
  check(): void {
    this.signal.throwIfAborted();
  }

  /** `err`, or the scope's own reason when the scope ended the call. */
  reason(err: unknown): unknown {
    return this.signal.aborted ? this.signal.reason : err;
  }

  /** Stops the timer and unlinks the caller's signal. Idempotent. */
  dispose(): void {
    clearTimeout(this.timer);
    this.unlink();
  }
}

/** A generated unary method, in its (request, metadata, options, callback) form. */
export type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** One attempt of a unary call within `scope`; cancels the call if the scope aborts. */
function unaryOnce<Req, Res>(conn: Connection, fn: UnaryMethod<Req, Res>, req: Req, scope: CallScope): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    // Each attempt gets the client's unary limit, within what is left of the scope's.
    const deadline = Math.min(scope.deadline ?? Infinity, Date.now() + conn.options.timeoutMs);
    const options: Partial<GrpcCallOptions> = { deadline: new Date(deadline) };
    let call: ClientUnaryCall | undefined;
    const onAbort = (): void => call?.cancel();
    const finish = (): void => scope.signal.removeEventListener('abort', onAbort);
    try {
      call = fn(req, conn.metadata(), options, (err, res) => {
        finish();
        if (err !== null) reject(err);
        else resolve(res);
      });
    } catch (err) {
      // Whatever creating the call threw (e.g. the client is closed), unchanged.
      // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
      reject(err);
      return;
    }
    scope.signal.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * A unary call named `method` (for error messages), retried on transient
 * failures when `retry` is true (only for calls that change nothing).
 * @throws DppaRpcError for a non-OK status; the signal's reason when aborted.
 */
export async function unary<Req, Res>(
  conn: Connection,
  method: string,
  fn: UnaryMethod<Req, Res>,
  req: Req,
  opts: CallOptions,
  retry: boolean,
): Promise<Res> {
  const scope = new CallScope(method, opts);
  try {
    return await inScope(conn, method, fn, req, scope, retry);
  } finally {
    scope.dispose();
  }
}

/** As {@link unary}, within a scope the caller owns (a push's or pull's). */
export async function inScope<Req, Res>(
  conn: Connection,
  method: string,
  fn: UnaryMethod<Req, Res>,
  req: Req,
  scope: CallScope,
  retry: boolean,
): Promise<Res> {
  try {
    scope.check();
    const attempt = async (): Promise<Res> => {
      try {
        return await unaryOnce(conn, fn, req, scope);
      } catch (err) {
        throw DppaRpcError.from(scope.reason(err), method);
      }
    };
    return await (retry
      ? retrying(attempt, conn.options.retry, { signal: scope.signal, onRetry: conn.options.onRetry })
      : attempt());
  } catch (err) {
    throw scope.reason(err);
  }
}

/** Does nothing; keeps status errors emitted after the reader has gone from becoming uncaught exceptions. */
function ignore(): void {}

/**
 * The messages of a server stream. Cancels the call when the reader stops
 * early (break, throw) or `signal` aborts; errors are grpc-js's, unconverted.
 */
export async function* readStream<T>(
  call: ClientReadableStream<T>,
  signal: AbortSignal,
): AsyncGenerator<T, void, undefined> {
  // grpc-js emits 'error' for a non-OK status even after the stream is destroyed; without a listener it would throw.
  call.on('error', ignore);
  const onAbort = (): void => call.cancel();
  signal.addEventListener('abort', onAbort, { once: true });
  if (signal.aborted) call.cancel();
  try {
    for await (const message of call as AsyncIterable<T>) yield message;
  } finally {
    signal.removeEventListener('abort', onAbort);
    // No-op when the call already has its status; otherwise tells the server we are gone.
    call.cancel();
  }
}
