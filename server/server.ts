/**
 * The aggregation server: gRPC services, the job runner and the metrics
 * endpoint, over one data folder. Usable in-process (tests) and from
 * `dppa serve` (cli.ts).
 *
 * Embedded (the default), jobs and events live in the data folder. With
 * `cluster`, the server is one replica of several sharing NATS JetStream
 * (cluster/): jobs in a KV bucket, events in the events stream, merges as
 * tasks on a work queue, and the data folder shared between replicas.
 */
import { readFile, readdir, rm, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import pMap from 'p-map';
import { DownloadServiceService } from '../proto/gen/dppa/v1/download.js';
import { EvaluationServiceService } from '../proto/gen/dppa/v1/evaluation.js';
import { JobServiceService } from '../proto/gen/dppa/v1/jobs.js';
import { PATCH_FILE_NAME } from '../proto/patch/index.js';
import { UploadServiceKeepingRecords } from './uploads/received-record.js';
import { HealthService } from '../proto/gen/grpc/health/v1/health.js';
import { buildInfo } from './build-info.js';
import { Cluster } from './cluster/cluster.js';
import { MergeTasks } from './cluster/merge-tasks.js';
import { SearchTasks } from './cluster/search-tasks.js';
import { TaskQueue, type TaskHandler } from './cluster/task-queue.js';
import { withDefaults, type ResolvedServerOptions, type ServerOptions } from './config.js';
import { RemoteEvaluators } from './dpa/remote-evaluators.js';
import { UnavailableError } from './errors.js';
import { FileJobEvents, type JobEvents } from './jobs/job-events.js';
import { JobRunner } from './jobs/job-runner.js';
import { LOAD_CONCURRENCY, LocalJobStore, type JobStore } from './jobs/job-store.js';
import { ClusterMetrics, Metrics, MetricsServer } from './metrics.js';
import { NatsEventPublisher } from './nats/event-publisher.js';
import { Authenticator } from './rpc/auth.js';
import { downloadService } from './rpc/download-service.js';
import { evaluationService } from './rpc/evaluation-service.js';
import { RpcWrapper } from './rpc/handler.js';
import { healthService, HealthState } from './rpc/health-service.js';
import { jobService } from './rpc/job-service.js';
import { widenReceiveWindow } from './rpc/receive-window.js';
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
  /** With `cluster`: the shared state and this replica's task lanes (merge tasks, and one search at a time). */
  cluster: { cluster: Cluster; queues: TaskQueue[]; merge: MergeTasks } | undefined;
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
    let cluster: Cluster | undefined;
    let store: JobStore;
    let events: JobEvents;
    let fileEvents: FileJobEvents | undefined;
    if (o.cluster) {
      // Before any listener: a replica that cannot reach the shared state does not start.
      cluster = await Cluster.join({ nats: o.nats!, dataDir: o.dataDir, taskAckWaitMs: o.taskAckWaitMs, log });
      store = cluster.store;
      events = cluster.events;
    } else {
      const local = await LocalJobStore.open(o.dataDir, log);
      fileEvents = new FileJobEvents(log);
      const loading = fileEvents;
      await pMap(
        local.list(),
        async (job) => {
          await removeStaleOutputs(local.dir(job.id));
          await loading.load(job.id, local.dir(job.id));
        },
        { concurrency: LOAD_CONCURRENCY },
      );
      store = local;
      events = fileEvents;
    }
    let spool: Spool;
    try {
      spool = await Spool.open({ store, log, shared: o.cluster, keepUploads: o.keepUploads });
    } catch (err) {
      // A replica that cannot read the shared folder must not keep its NATS connection (and the process) alive.
      await events.close();
      await cluster?.leave();
      throw err;
    }
    const metrics = new Metrics(
      { jobsByState: () => store.countByState(), spoolBytes: () => spool.totalBytes(), dataDisk: () => diskSpace(o.dataDir) },
      buildInfo(),
    );
    let publisher: NatsEventPublisher | undefined;
    if (o.nats !== undefined && fileEvents !== undefined) {
      // Before any listener: a server that should publish events but cannot reach NATS does not start.
      try {
        publisher = await NatsEventPublisher.start({
          ...o.nats, events: fileEvents, jobIds: store.list().map((j) => j.id), jobDir: (id) => store.dir(id), registry: metrics.registry, log,
        });
      } catch (err) {
        await events.close();
        throw err;
      }
    }
    const broker = new RemoteEvaluators();
    let replica: Running['cluster'];
    let search: SearchTasks | undefined;
    if (cluster !== undefined) {
      const c = cluster;
      const clusterMetrics = new ClusterMetrics(metrics.registry);
      const handle: TaskHandler = (task, signal) => (task.kind === 'search' ? search!.handle(task, signal) : merge.handle(task, signal));
      const queue = (group: 'merge' | 'search', lanes: number): TaskQueue =>
        new TaskQueue({ js: c.js, jsm: c.jsm, group, lanes, ackWaitMs: o.taskAckWaitMs, handle, metrics: clusterMetrics, log });
      // One search at a time per replica, so that the parties' searches spread over the replicas.
      const queues = [queue('merge', MergeTasks.lanes(o.mergeWorkers)), queue('search', 1)];
      const merge = new MergeTasks({ store, events, spool, kv: c.kv, queue: () => queues[0]!, metrics, log, mergeWorkers: o.mergeWorkers });
      search = new SearchTasks({ store, events, spool, metrics, log, broker, queue: () => queues[1]!, merge });
      replica = { cluster: c, queues, merge };
    }
    const runner = new JobRunner({
      store, events, spool, metrics, log, mergeWorkers: o.mergeWorkers, broker, storageRetryMs: o.storageRetryMs,
      ...(replica === undefined || search === undefined ? {} : { distributed: { search, merge: replica.merge } }),
    });
    const auth = new Authenticator(o.adminToken, store);
    const health = new HealthState(SERVICE_NAMES);
    const draining = new AbortController();
    const closing = new AbortController();
    const rpc = new RpcWrapper(metrics, log, { draining: draining.signal, closing: closing.signal });

    const grpc = new Server({
      'grpc.max_receive_message_length': o.maxMessageBytes,
      'grpc.max_send_message_length': o.maxMessageBytes,
      // Finds connections whose client vanished or froze (docs/server.md, "Keepalive"). grpc-js servers answer
      // client pings at any rate (no ping-strike policy), so the SDK's own 30 s pings are always permitted.
      'grpc.keepalive_time_ms': o.keepaliveMs,
      'grpc.keepalive_timeout_ms': o.keepaliveTimeoutMs,
    });
    grpc.addService(JobServiceService, jobService({ store, events, spool, runner, auth, maxUploadBytes: o.maxUploadBytes, clustered: o.cluster }, rpc));
    grpc.addService(UploadServiceKeepingRecords, uploadService({ store, events, spool, runner, metrics, auth }, rpc));
    grpc.addService(DownloadServiceService, downloadService({ store, auth }, rpc));
    grpc.addService(EvaluationServiceService, evaluationService({ store, broker, auth, runner }, rpc));
    grpc.addService(HealthService, healthService(health, rpc));
    addReflection(grpc);

    const metricsServer = new MetricsServer(metrics.registry);
    let grpcPort: number;
    let metricsPort: number;
    try {
      grpcPort = await bind(grpc, o.grpcHost, o.grpcPort, await credentials(o));
      widenReceiveWindow(grpc, o.receiveWindowBytes, log);
      metricsPort = await metricsServer.listen(o.grpcHost, o.metricsPort);
    } catch (err) {
      grpc.forceShutdown();
      await metricsServer.close();
      await publisher?.stop();
      await events.close();
      await replica?.merge.close();
      await cluster?.leave();
      throw err;
    }
    this.running = { grpc, grpcPort, metricsServer, metricsPort, store, events, runner, broker, publisher, cluster: replica, rpc, health, draining, closing };
    for (const q of replica?.queues ?? []) q.start();
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
    // Tasks in progress go back to the queue for the other replicas: stopping the merge threads cuts the tensors short.
    const lanes = Promise.all((r.cluster?.queues ?? []).map((q) => q.stop()));
    await r.cluster?.merge.close();
    await lanes;
    // No event is appended any more: publish what is pending while NATS is there (the rest goes out at the next start).
    await r.publisher?.stop({ flushMs: graceful ? Math.min(this.opts.shutdownGraceMs, 5000) : 0 });
    await r.metricsServer.close();
    await r.events.close();
    await r.cluster?.cluster.leave();
    log.info('server stopped');
  }
}

/** Removes temporary merge outputs a crash or a stop left behind (`merged.tmp-*`, `merged.old-*`, `merged-patch.dppa.tmp-*`). */
async function removeStaleOutputs(jobDir: string): Promise<void> {
  for (const name of await readdir(jobDir)) {
    if (name.startsWith('merged.tmp-') || name.startsWith('merged.old-') || name.startsWith(`${PATCH_FILE_NAME}.tmp-`)) await rm(join(jobDir, name), { recursive: true, force: true });
  }
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

function bind(server: Server, host: string, port: number, creds: ServerCredentials): Promise<number> {
  const address = host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
  return new Promise((resolve, reject) => server.bindAsync(address, creds, (err, bound) => (err === null ? resolve(bound) : reject(err))));
}
