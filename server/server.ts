/**
 * The aggregation server: gRPC services, the job runner and the metrics
 * endpoint, over one data folder. Usable in-process (tests) and from
 * `dppa serve` (cli.ts).
 */
import { readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { DownloadServiceService } from '../proto/gen/dppa/v1/download.js';
import { EvaluationServiceService } from '../proto/gen/dppa/v1/evaluation.js';
import { JobServiceService } from '../proto/gen/dppa/v1/jobs.js';
import { UploadServiceService } from '../proto/gen/dppa/v1/upload.js';
import { HealthService } from '../proto/gen/grpc/health/v1/health.js';
import { withDefaults, type ResolvedServerOptions, type ServerOptions } from './config.js';
import { RemoteEvaluators } from './dpa/remote-evaluators.js';
import { UnavailableError } from './errors.js';
import { JobEvents } from './jobs/job-events.js';
import { JobRunner } from './jobs/job-runner.js';
import { JobStore } from './jobs/job-store.js';
import { Metrics, MetricsServer } from './metrics.js';
import { NatsEventPublisher } from './nats/event-publisher.js';
import { Authenticator } from './rpc/auth.js';
import { downloadService } from './rpc/download-service.js';
import { evaluationService } from './rpc/evaluation-service.js';
import { RpcWrapper } from './rpc/handler.js';
import { healthService, HealthState } from './rpc/health-service.js';
import { jobService } from './rpc/job-service.js';
import { addReflection } from './rpc/reflection.js';
import { uploadService } from './rpc/upload-service.js';
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
  'grpc.health.v1.Health',
];

interface Running {
  grpc: Server;
  grpcPort: number;
  metricsServer: MetricsServer;
  metricsPort: number;
  store: JobStore;
  events: JobEvents;
  runner: JobRunner;
  broker: RemoteEvaluators;
  publisher: NatsEventPublisher | undefined;
  rpc: RpcWrapper;
  health: HealthState;
  draining: AbortController;
  closing: AbortController;
}

/** One aggregation server. `start()` it, then `stop()` it. */
export class DppaServer {
  private readonly opts: ResolvedServerOptions;
  private running: Running | undefined;
  private stopping: Promise<void> | undefined;

  /** @throws ConfigError naming the option that is wrong. */
  constructor(options: ServerOptions) {
    this.opts = withDefaults(options);
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
   * @throws Error if a port cannot be bound or the data folder cannot be read.
   * @throws NatsUnavailableError naming the URL if `nats` is set and NATS cannot be reached.
   */
  async start(): Promise<void> {
    if (this.running !== undefined) throw new Error('the server is already running');
    const o = this.opts;
    const log = o.logger;
    const store = await JobStore.open(o.dataDir, log);
    const events = new JobEvents(log);
    for (const job of store.list()) {
      await removeStaleOutputs(store.dir(job.id));
      await events.load(job.id, store.dir(job.id));
    }
    const spool = await Spool.open(store, log);
    const metrics = new Metrics({ jobsByState: () => store.countByState(), spoolBytes: () => spool.totalBytes() });
    let publisher: NatsEventPublisher | undefined;
    if (o.nats !== undefined) {
      // Before any listener: a server that should publish events but cannot reach NATS does not start.
      try {
        publisher = await NatsEventPublisher.start({
          ...o.nats, events, jobIds: store.list().map((j) => j.id), jobDir: (id) => store.dir(id), registry: metrics.registry, log,
        });
      } catch (err) {
        await events.close();
        throw err;
      }
    }
    const broker = new RemoteEvaluators();
    const runner = new JobRunner({ store, events, spool, metrics, log, mergeWorkers: o.mergeWorkers, broker });
    const auth = new Authenticator(o.adminToken, store);
    const health = new HealthState(SERVICE_NAMES);
    const draining = new AbortController();
    const closing = new AbortController();
    const rpc = new RpcWrapper(metrics, log, { draining: draining.signal, closing: closing.signal });

    const grpc = new Server({
      'grpc.max_receive_message_length': o.maxMessageBytes,
      'grpc.max_send_message_length': o.maxMessageBytes,
    });
    grpc.addService(JobServiceService, jobService({ store, events, spool, runner, auth, maxUploadBytes: o.maxUploadBytes }, rpc));
    grpc.addService(UploadServiceService, uploadService({ store, events, spool, runner, metrics, auth }, rpc));
    grpc.addService(DownloadServiceService, downloadService({ store, auth }, rpc));
    grpc.addService(EvaluationServiceService, evaluationService({ store, broker, auth }, rpc));
    grpc.addService(HealthService, healthService(health, rpc));
    addReflection(grpc);

    const metricsServer = new MetricsServer(metrics.registry);
    let grpcPort: number;
    let metricsPort: number;
    try {
      grpcPort = await bind(grpc, o.grpcHost, o.grpcPort, await credentials(o));
      metricsPort = await metricsServer.listen(o.grpcHost, o.metricsPort);
    } catch (err) {
      grpc.forceShutdown();
      await metricsServer.close();
      await publisher?.stop();
      await events.close();
      throw err;
    }
    this.running = { grpc, grpcPort, metricsServer, metricsPort, store, events, runner, broker, publisher, rpc, health, draining, closing };
    runner.resume();
    log.info('server started', { dataDir: o.dataDir, grpc: `${o.grpcHost}:${grpcPort}`, metricsPort, jobs: store.list().length });
  }

  /**
   * Stops the server (see {@link StopOptions}). Resolves once every listener
   * is closed and every file written. Calling it again waits for the same stop.
   */
  stop(opts: StopOptions = {}): Promise<void> {
    this.stopping ??= this.shutdown(opts.graceful ?? true).finally(() => {
      this.running = undefined;
      this.stopping = undefined;
    });
    return this.stopping;
  }

  private async shutdown(graceful: boolean): Promise<void> {
    const r = this.running;
    if (r === undefined) return;
    const log = this.opts.logger;
    log.info('server stopping', { graceful });
    r.health.setNotServing();
    // One turn of the event loop lets health watchers send NOT_SERVING before the draining signal ends them.
    await new Promise((resolve) => setImmediate(resolve));
    r.draining.abort(new UnavailableError('the server is shutting down'));
    const cutOff = (): void => {
      if (!r.closing.signal.aborted) r.closing.abort(new UnavailableError('the server is shutting down'));
    };
    if (!graceful) cutOff();
    // A merge can take many minutes: it is aborted at once and redone at the next start; a search resumes from its record.
    const merges = r.runner.stop();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        cutOff();
        // Calls have had their signal aborted; give them a moment to send their status, then drop the connections.
        setTimeout(() => r.grpc.forceShutdown(), 100).unref();
      }, graceful ? this.opts.shutdownGraceMs : 0);
      r.grpc.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    cutOff();
    // Handlers of calls cut off may still be discarding a partial tensor or appending an event.
    await r.rpc.idle();
    await merges;
    // No event is appended any more: publish what is pending while NATS is there (the rest goes out at the next start).
    await r.publisher?.stop({ flushMs: graceful ? Math.min(this.opts.shutdownGraceMs, 5000) : 0 });
    await r.metricsServer.close();
    await r.events.close();
    log.info('server stopped');
  }
}

/** Removes temporary merge outputs a crash or a stop left behind (`merged.tmp-*`, `merged.old-*`). */
async function removeStaleOutputs(jobDir: string): Promise<void> {
  for (const name of await readdir(jobDir)) {
    if (name.startsWith('merged.tmp-') || name.startsWith('merged.old-')) await rm(join(jobDir, name), { recursive: true, force: true });
  }
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

function bind(server: Server, host: string, port: number, creds: ServerCredentials): Promise<number> {
  const address = host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
  return new Promise((resolve, reject) => server.bindAsync(address, creds, (err, bound) => (err === null ? resolve(bound) : reject(err))));
}
