/**
 * The one wrapper every RPC handler goes through: one AbortSignal for cancellation, deadline and shutdown, errors
 * mapped to statuses, metrics recorded. See docs/design/rpc.md.
 */
import { once } from 'node:events';
import {
  status as Code,
  type handleBidiStreamingCall,
  type handleClientStreamingCall,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type Metadata,
  type ServerUnaryCall,
  type ServerWritableStream,
} from '@grpc/grpc-js';
import { CancelledError, DeadlineExceededError } from '../errors.js';
import type { Logger } from '../log.js';
import type { GrpcType, Metrics, RpcCallMetrics } from '../metrics.js';
import { withCallFields, type CallFields } from './call-fields.js';
import { toStatus, type RpcStatus } from './status.js';

/** What a handler gets besides its request. */
export interface CallContext {
  /** Aborted (with a CancelledError, DeadlineExceededError or UnavailableError reason) when the call should stop. */
  signal: AbortSignal;
  /** The request metadata (carries `authorization`). */
  metadata: Metadata;
}

/** Signals of the server's shutdown, in its two steps. */
export interface ShutdownSignals {
  /** Aborted when a graceful stop begins: streams that never end by themselves (watchers) end then. */
  draining: AbortSignal;
  /** Aborted when calls must stop: at once for a hard stop, after the grace period for a graceful one. */
  closing: AbortSignal;
}

/** What every kind of call has (grpc-js does not export its own name for it). */
type SurfaceCall = Pick<ServerUnaryCall<unknown, unknown>, 'getDeadline' | 'metadata' | 'cancelled'> &
  NodeJS.EventEmitter;

/** Sends one message of a server stream, waiting for `drain` when the transport is full. */
export type Send<T> = (message: T) => Promise<void>;

/** Builds grpc-js handlers from async functions. */
export class RpcWrapper {
  /** Handlers still running, so that a stop can wait for their cleanup (spool files, event appends). */
  private readonly inFlight = new Set<Promise<void>>();

  constructor(
    private readonly metrics: Metrics,
    private readonly log: Logger,
    private readonly shutdown: ShutdownSignals,
  ) {}

  /** A unary handler. `method` is the gRPC path without its leading slash, e.g. `dppa.v1.JobService/CreateJob` (metric labels). */
  unary<Req, Res>(method: string, fn: (request: Req, ctx: CallContext) => Promise<Res>): handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const body = async (ctx: CallContext, m: RpcCallMetrics): Promise<void> => {
        m.received();
        const response = await fn(call.request, ctx);
        m.sent();
        callback(null, response);
      };
      void this.run(method, 'unary', call, 'closing', body, (st) => callback(statusError(st)));
    };
  }

  /** A client-streaming handler; the requests are read with `for await`, which pulls one message at a time. */
  clientStream<Req, Res>(
    method: string,
    fn: (requests: AsyncIterable<Req>, ctx: CallContext) => Promise<Res>,
  ): handleClientStreamingCall<Req, Res> {
    return (call, callback) => {
      const body = async (ctx: CallContext, m: RpcCallMetrics): Promise<void> => {
        const response = await fn(counted(call, m), ctx);
        m.sent();
        callback(null, response);
      };
      void this.run(method, 'client_stream', call, 'closing', body, (st) => callback(statusError(st)));
    };
  }

  /**
   * A server-streaming handler. The stream is ended when `fn` resolves.
   * @param endless - The stream only ends when the caller leaves (watchers): end it as soon as a graceful stop begins.
   */
  serverStream<Req, Res>(
    method: string,
    fn: (request: Req, send: Send<Res>, ctx: CallContext) => Promise<void>,
    endless = false,
  ): handleServerStreamingCall<Req, Res> {
    return (call) =>
      this.streamOut(method, 'server_stream', call, endless, (send, ctx, m) => {
        m.received();
        return fn(call.request, send, ctx);
      });
  }

  /**
   * A bidirectional handler: the caller's messages are read from `requests`,
   * answers go out through `send`. The stream is ended when `fn` resolves.
   * @param endless - The stream only ends when the caller leaves or the handler decides: end it as soon as a graceful stop begins.
   */
  bidiStream<Req, Res>(
    method: string,
    fn: (requests: AsyncIterable<Req>, send: Send<Res>, ctx: CallContext) => Promise<void>,
    endless = false,
  ): handleBidiStreamingCall<Req, Res> {
    return (call) =>
      this.streamOut(method, 'bidi_stream', call, endless, (send, ctx, m) => fn(counted(call, m), send, ctx));
  }

  /** Runs a handler that answers with a stream, ended when `fn` resolves. */
  private streamOut<Res>(
    method: string,
    type: GrpcType,
    call: Writable<Res> & SurfaceCall & { end(): void },
    endless: boolean,
    fn: (send: Send<Res>, ctx: CallContext, m: RpcCallMetrics) => Promise<void>,
  ): void {
    void this.run(
      method,
      type,
      call,
      endless ? 'draining' : 'closing',
      async (ctx, m) => {
        const counting: Send<Res> = async (message) => {
          await send(call, message, ctx.signal);
          m.sent();
        };
        await fn(counting, ctx, m);
        call.end();
      },
      (st) => call.emit('error', statusError(st)),
    );
  }

  /** Resolves once every handler started so far has finished, cleanup included. */
  async idle(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
  }

  private run(
    method: string,
    type: GrpcType,
    call: SurfaceCall,
    stopOn: keyof ShutdownSignals,
    body: (ctx: CallContext, m: RpcCallMetrics) => Promise<void>,
    fail: (st: RpcStatus) => void,
  ): Promise<void> {
    // The call's job and party for its log lines: from the request when it names them, from the token once checked.
    const request = (call as { request?: { jobId?: unknown; party?: unknown } }).request;
    const fields: CallFields = {};
    if (typeof request?.jobId === 'string' && request.jobId !== '') fields.jobId = request.jobId;
    if (typeof request?.party === 'string' && request.party !== '') fields.party = request.party;
    const running = withCallFields(fields, () =>
      this.runTracked(method, type, call, stopOn, body, fail, fields),
    ).finally(() => this.inFlight.delete(running));
    this.inFlight.add(running);
    return running;
  }

  private async runTracked(
    method: string,
    type: GrpcType,
    call: SurfaceCall,
    stopOn: keyof ShutdownSignals,
    body: (ctx: CallContext, m: RpcCallMetrics) => Promise<void>,
    fail: (st: RpcStatus) => void,
    fields: CallFields,
  ): Promise<void> {
    const started = performance.now();
    const m = this.metrics.startRpc(type, method);
    const controller = new AbortController();
    const abort = (reason: Error): void => {
      if (!controller.signal.aborted) controller.abort(reason);
    };
    const onCancel = (): void => abort(new CancelledError('the caller cancelled the call'));
    const shutdown = this.shutdown[stopOn];
    const onShutdown = (): void => abort(shutdown.reason as Error);
    call.on('cancelled', onCancel);
    shutdown.addEventListener('abort', onShutdown);
    if (shutdown.aborted) onShutdown();
    const deadline = call.getDeadline();
    const ms = (deadline instanceof Date ? deadline.getTime() : deadline) - Date.now();
    const timer = Number.isFinite(ms)
      ? setTimeout(() => abort(new DeadlineExceededError('deadline exceeded')), Math.max(0, ms))
      : undefined;
    let code = Code.OK;
    try {
      await body({ signal: controller.signal, metadata: call.metadata }, m);
    } catch (thrown) {
      // Once the call is aborted, whatever the handler threw on the way out is a consequence of that.
      const st = toStatus(
        controller.signal.aborted ? controller.signal.reason : thrown,
        this.log.child({ rpc: method, ...fields }),
      );
      code = st.code;
      if (!call.cancelled) fail(st);
    } finally {
      clearTimeout(timer);
      call.off('cancelled', onCancel);
      shutdown.removeEventListener('abort', onShutdown);
      m.handled(code);
      // One line per call: debug when it succeeded or the caller left, info when the caller got an error (the server's own errors are logged by toStatus).
      const line = { rpc: method, ...fields, code: Code[code], ms: Math.round(performance.now() - started) };
      if (code === Code.OK || code === Code.CANCELLED) this.log.debug('rpc', line);
      else this.log.info('rpc failed', line);
    }
  }
}

function statusError(st: RpcStatus): Error & RpcStatus {
  return Object.assign(new Error(st.details), st);
}

/** The caller's messages, each counted as it is read. */
async function* counted<T>(messages: AsyncIterable<T>, m: RpcCallMetrics): AsyncGenerator<T, void, undefined> {
  for await (const message of messages) {
    m.received();
    yield message;
  }
}

/** The writing side of a server or bidirectional stream. */
type Writable<T> = Pick<ServerWritableStream<unknown, T>, 'write'> & NodeJS.EventEmitter;

async function send<T>(call: Writable<T>, message: T, signal: AbortSignal): Promise<void> {
  signal.throwIfAborted();
  if (call.write(message)) return;
  try {
    await once(call, 'drain', { signal });
  } catch (err) {
    throw signal.aborted ? signal.reason : err;
  }
}
