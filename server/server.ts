/**
 * The aggregation server: one backend (backend/: local, or replicas on NATS
 * JetStream), the job runner, the gRPC services and the metrics endpoint,
 * opened in order and closed in reverse. Usable in-process (tests) and from
 * `dppa serve` (cli.ts).
 */
import { readFile, statfs } from 'node:fs/promises';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { DownloadServiceService } from '../proto/gen/dppa/v1/download.js';
import { EvaluationServiceService } from '../proto/gen/dppa/v1/evaluation.js';
import { JobServiceService } from '../proto/gen/dppa/v1/jobs.js';
import { UploadServiceKeepingRecords } from './uploads/received-record.js';
import { HealthService } from '../proto/gen/grpc/health/v1/health.js';
import type { Backend } from './backend/backend.js';
import { JetStreamBackend } from './backend/jetstream.js';
import { LocalBackend } from './backend/local.js';
import { buildInfo } from './build-info.js';
import { Closers, type CloseContext } from './closers.js';
import { withDefaults, type InternalServerOptions, type ResolvedServerOptions, type ServerOptions } from './config.js';
import { RemoteEvaluators } from './dpa/remote-evaluators.js';
import { UnavailableError } from './errors.js';
import type { JobEvents } from './jobs/job-events.js';
import { FailurePolicy } from './jobs/failure-policy.js';
import { JobRunner } from './jobs/job-runner.js';
import { Metrics, MetricsServer } from './metrics.js';
import { Authenticator } from './rpc/auth.js';
import { downloadService } from './rpc/download-service.js';
import { evaluationService } from './rpc/evaluation-service.js';
import { RpcWrapper } from './rpc/handler.js';
import { healthService, HealthState } from './rpc/health-service.js';
import { jobService } from './rpc/job-service.js';
import { widenReceiveWindow } from './rpc/receive-window.js';
import { addReflection } from './rpc/reflection.js';
import { uploadService } from './rpc/upload-service.js';
import { secureService } from './rpc/secure-service.js';
import { SecureJobs } from './secure/secure-jobs.js';
import { SecureAggregationServiceService } from '../proto/gen/dppa/v1/secure.js';
import { Spool } from './uploads/spool.js';

/** Options of {@link DppaServer.stop}. */
export interface StopOptions {
  /**
   * Let in-flight calls finish (up to `shutdownGraceMs`) before cutting them
   * off; otherwise cut them off at once. Either way new calls are refused,
   * a running merge is aborted (its job merges again at the next start) and
   * nothing half-written is left under a final name; a factor search is
   * stopped and resumes from its recorded evaluations at the next start.
   * @default true
   */
  graceful?: boolean;
}

/** Services named by the health service. */
const SERVICE_NAMES = [
  'dppa.v1.JobService',
  'dppa.v1.UploadService',
  'dppa.v1.DownloadService',
  'dppa.v1.EvaluationService',
  'dppa.v1.SecureAggregationService',
  'grpc.health.v1.Health',
];

interface Running {
  grpcPort: number;
  metricsPort: number;
  events: JobEvents;
  broker: RemoteEvaluators;
  health: HealthState;
  draining: AbortController;
  closing: AbortController;
  /** What start() opened, closed in reverse order by stop(). */
  closers: Closers;
  /** Cuts off the calls still open and drops the gRPC connections (a stop that must not wait any longer). */
  hurry: () => void;
}

/** One aggregation server. `start()` it, then `stop()` it. */
export class DppaServer {
  private readonly opts: ResolvedServerOptions;
  private running: Running | undefined;
  private stopping: Promise<void> | undefined;
  /** How the pending stop closes what is left; a second, not graceful, stop makes it not graceful. */
  private stopContext: CloseContext | undefined;

  /**
   * @param internal - Test hooks, not part of the API: only `dppa serve`'s `main` passes them (config.ts).
   * @throws ConfigError naming the option that is wrong.
   */
  constructor(options: ServerOptions, internal: InternalServerOptions = {}) {
    this.opts = withDefaults(options, internal);
  }

  /** Host both listeners bind to. */
  get host(): string {
    return this.opts.grpcHost;
  }

  /** Port of the gRPC listener. @throws Error before `start()`. */
  get grpcPort(): number {
    return this.state().grpcPort;
  }

  /** Port of the metrics listener. @throws Error before `start()`. */
  get metricsPort(): number {
    return this.state().metricsPort;
  }

  /** The job event logs (tests check that watchers do not leak). @throws Error before `start()`. */
  get events(): JobEvents {
    return this.state().events;
  }

  /** The parties' evaluation streams and requests (tests check that none leak). @throws Error before `start()`. */
  get evaluators(): RemoteEvaluators {
    return this.state().broker;
  }

  private state(): Running {
    if (this.running === undefined) throw new Error('the server is not running');
    return this.running;
  }

  /**
   * Recovers the data folder (jobs, complete uploads; partial ones are
   * deleted), binds both listeners and resumes jobs that were searching, merging or
   * whose uploads are all in.
   * @throws GrpcBindError if the gRPC port cannot be bound.
   * @throws Error if the metrics port cannot be bound or the data folder cannot be read.
   * @throws NatsUnavailableError naming the URL if `nats` is set and NATS cannot be reached.
   */
  async start(): Promise<void> {
    if (this.running !== undefined) throw new Error('the server is already running');
    const closers = new Closers();
    try {
      this.running = await this.open(closers);
    } catch (err) {
      await closers
        .close({ graceful: false })
        .catch((e: unknown) => this.opts.logger.warn('cleaning up a failed start failed', { err: e }));
      throw err;
    }
  }

  /** Opens everything, pushing each resource on `closers` as soon as it is open. */
  private async open(closers: Closers): Promise<Running> {
    const o = this.opts;
    const log = o.logger;
    // Before any listener: a server that cannot reach its backend (or, with --nats, publish its events) does not start.
    let backend: Backend;
    let local: LocalBackend | undefined;
    if (o.cluster) backend = await JetStreamBackend.join(o);
    else backend = local = await LocalBackend.open({ dataDir: o.dataDir, log });
    closers.push('backend', ({ graceful }) =>
      backend.close({ flushMs: graceful ? Math.min(o.shutdownGraceMs, 5000) : 0 }),
    );
    const { store, events } = backend;
    const spool = await Spool.open({ store, log, shared: backend.sharedFolder, keepUploads: o.keepUploads });
    const metrics = new Metrics(
      {
        jobsByState: () => store.countByState(),
        spoolBytes: () => spool.totalBytes(),
        dataDisk: () => diskSpace(o.dataDir),
      },
      buildInfo(),
    );
    if (o.nats !== undefined && local !== undefined) await local.publishEvents(o.nats, metrics, log);
    const broker = new RemoteEvaluators();
    const policy = new FailurePolicy({ taskAttempts: o.taskAttempts, transient: (err) => backend.transient(err) });
    const steps = backend.steps({
      spool,
      metrics,
      log,
      broker,
      mergeWorkers: o.mergeWorkers,
      onMerged: (jobId) => runner.merged(jobId),
      policy,
      taskFailed: (jobId, step, err) => runner.stepFailed(jobId, step, err),
      taskDone: (jobId) => runner.taskDone(jobId),
    });
    closers.push('job steps', () => steps.close());
    const secure = new SecureJobs({
      store,
      events,
      spool,
      metrics,
      log,
      poke: (jobId) => runner.poke(jobId),
      maskedLeaseMs: o.maskedLeaseMs,
      beforeCloseClaim: o.beforeCloseClaim,
    });
    closers.push('secure phase timers', () => secure.stop());
    const runner = new JobRunner({
      secure,
      store,
      events,
      spool,
      metrics,
      log,
      broker,
      steps,
      policy,
      sweepMs: backend.sweepMs,
      storageRetryMs: o.storageRetryMs,
    });
    const auth = new Authenticator(o.adminToken, store);
    const health = new HealthState(SERVICE_NAMES);
    const draining = new AbortController();
    const closing = new AbortController();
    const rpc = new RpcWrapper(metrics, log, { draining: draining.signal, closing: closing.signal });

    const metricsServer = new MetricsServer(metrics.registry);
    closers.push('metrics listener', () => metricsServer.close());
    const grpc = new Server({
      'grpc.max_receive_message_length': o.maxMessageBytes,
      'grpc.max_send_message_length': o.maxMessageBytes,
      // Finds connections whose client vanished or froze (docs/server.md, "Keepalive"). grpc-js servers answer
      // client pings at any rate (no ping-strike policy), so the SDK's own 30 s pings are always permitted.
      'grpc.keepalive_time_ms': o.keepaliveMs,
      'grpc.keepalive_timeout_ms': o.keepaliveTimeoutMs,
    });
    const remoteEvaluators = backend.remoteEvaluators;
    grpc.addService(
      JobServiceService,
      jobService({ store, events, spool, runner, auth, maxUploadBytes: o.maxUploadBytes, remoteEvaluators }, rpc),
    );
    grpc.addService(UploadServiceKeepingRecords, uploadService({ store, events, spool, runner, metrics, auth }, rpc));
    grpc.addService(DownloadServiceService, downloadService({ store, auth }, rpc));
    grpc.addService(EvaluationServiceService, evaluationService({ store, broker, auth, runner }, rpc));
    grpc.addService(SecureAggregationServiceService, secureService({ store, secure, auth }, rpc));
    grpc.addService(HealthService, healthService(health, rpc));
    addReflection(grpc);
    // The runner stops together with the listener: runner.stop() starts and tryShutdown follows in the same tick, so
    // new calls are refused at once while a merge (which can take many minutes) is aborted, to be redone at the next
    // start; a search resumes from its record.
    closers.push('gRPC listener and job runner', ({ graceful }) =>
      stopTogether(runner.stop(), this.drain(grpc, rpc, closing, graceful)),
    );
    const grpcPort = await bind(grpc, o.grpcHost, o.grpcPort, await credentials(o));
    widenReceiveWindow(grpc, o.receiveWindowBytes, log);
    const metricsPort = await metricsServer.listen(o.grpcHost, o.metricsPort);

    steps.start();
    runner.resume();
    log.info('server started', {
      dataDir: o.dataDir,
      grpc: `${o.grpcHost}:${grpcPort}`,
      metricsPort,
      jobs: store.list().length,
    });
    const hurry = (): void => {
      cutOff(closing);
      // As drain() does: the calls, their signal aborted, get a moment to send their status.
      setTimeout(() => grpc.forceShutdown(), 100).unref();
    };
    return { grpcPort, metricsPort, events, broker, health, draining, closing, closers, hurry };
  }

  /**
   * Stops the server (see {@link StopOptions}). Resolves once every listener
   * is closed and every file written. Calling it again waits for the same stop;
   * a graceful stop under way is made to stop at once by calling it again with
   * `graceful: false` (a second SIGINT).
   */
  stop(opts: StopOptions = {}): Promise<void> {
    const graceful = opts.graceful ?? true;
    if (this.stopping !== undefined) {
      if (!graceful && this.stopContext !== undefined && this.stopContext.graceful) {
        this.stopContext.graceful = false;
        this.running?.hurry();
      }
      return this.stopping;
    }
    const ctx: CloseContext = { graceful };
    this.stopContext = ctx;
    this.stopping = this.shutdown(ctx).finally(() => {
      this.running = undefined;
      this.stopping = undefined;
      this.stopContext = undefined;
    });
    return this.stopping;
  }

  private async shutdown(ctx: CloseContext): Promise<void> {
    const r = this.running;
    if (r === undefined) return;
    const { graceful } = ctx;
    const log = this.opts.logger;
    log.info('server stopping', { graceful });
    r.health.setNotServing();
    // One turn of the event loop lets health watchers send NOT_SERVING before the draining signal ends them.
    await new Promise((resolve) => setImmediate(resolve));
    r.draining.abort(new UnavailableError('the server is shutting down'));
    if (!graceful) cutOff(r.closing);
    // The same object throughout: a second stop that is not graceful reaches the resources not yet closed.
    await r.closers.close(ctx);
    log.info('server stopped');
  }

  /**
   * Lets in-flight calls finish (up to the grace period when graceful), then
   * cuts them off and waits for their handlers (which may still be discarding
   * a partial tensor or appending an event).
   */
  private async drain(grpc: Server, rpc: RpcWrapper, closing: AbortController, graceful: boolean): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(
        () => {
          cutOff(closing);
          // Calls have had their signal aborted; give them a moment to send their status, then drop the connections.
          setTimeout(() => grpc.forceShutdown(), 100).unref();
        },
        graceful ? this.opts.shutdownGraceMs : 0,
      );
      grpc.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    cutOff(closing);
    await rpc.idle();
  }
}

/** Waits for both, started together by the caller; rethrows the first failure once both have settled. */
async function stopTogether(...stops: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(stops);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** Aborts the calls still running. */
function cutOff(closing: AbortController): void {
  if (!closing.signal.aborted) closing.abort(new UnavailableError('the server is shutting down'));
}

async function diskSpace(dir: string): Promise<{ freeBytes: number; sizeBytes: number }> {
  const fs = await statfs(dir);
  return { freeBytes: fs.bavail * fs.bsize, sizeBytes: fs.blocks * fs.bsize };
}

async function credentials(o: ResolvedServerOptions): Promise<ServerCredentials> {
  if (o.tls === undefined) return ServerCredentials.createInsecure();
  const [cert, key, ca] = await Promise.all([
    readFile(o.tls.certFile),
    readFile(o.tls.keyFile),
    o.tls.clientCaFile === undefined ? undefined : readFile(o.tls.clientCaFile),
  ]);
  return ServerCredentials.createSsl(ca ?? null, [{ cert_chain: cert, private_key: key }], ca !== undefined);
}

/** The gRPC listener cannot listen on its host and port (in use, no such interface). */
export class GrpcBindError extends Error {
  override name = 'GrpcBindError';
  constructor(
    readonly address: string,
    /** What went wrong, without grpc-js's wrapping: `EADDRINUSE: address already in use 127.0.0.1:50051`. */
    readonly reason: string,
    opts?: ErrorOptions,
  ) {
    super(`cannot listen on ${address}: ${reason}`, opts);
  }
}

/** @throws GrpcBindError naming the host and port. */
function bind(server: Server, host: string, port: number, creds: ServerCredentials): Promise<number> {
  const address = host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
  return new Promise((resolve, reject) =>
    server.bindAsync(address, creds, (err, bound) => {
      if (err === null) return resolve(bound);
      // grpc-js: "No address added out of total 1 resolved errors: [listen EADDRINUSE: …]".
      reject(
        new GrpcBindError(address, err.message.replace(/^.*errors: \[(.*)\]$/s, '$1').replace(/^listen /, ''), {
          cause: err,
        }),
      );
    }),
  );
}
