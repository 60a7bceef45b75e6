/**
 * Prometheus metrics of the server, in a registry of its own (never the
 * global one, so that several servers in one process, as in tests, do not
 * collide), and the HTTP endpoint that serves them.
 *
 * Labels take values from fixed sets only (RPC method, status code, job
 * state, evaluator kind): never a party, job or tensor name.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

/** Reads values that live elsewhere at scrape time. */
export interface MetricsSources {
  /** Number of jobs per state name. */
  jobsByState(): Record<string, number>;
  /** Bytes of upload spool on disk. */
  spoolBytes(): number;
}

/** Every metric the server exports. */
export class Metrics {
  /** The registry the metrics live in; `metrics()` renders it. */
  readonly registry = new Registry();
  readonly rpcRequests = new Counter({
    name: 'dppa_rpc_requests_total',
    help: 'gRPC calls finished, by method and status code.',
    labelNames: ['method', 'code'] as const,
    registers: [this.registry],
  });
  readonly rpcDuration = new Histogram({
    name: 'dppa_rpc_duration_seconds',
    help: 'Duration of gRPC calls, by method (streams: until their status is sent).',
    labelNames: ['method'] as const,
    buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, 1800],
    registers: [this.registry],
  });
  readonly uploadBytes = new Counter({
    name: 'dppa_upload_bytes_total',
    help: 'Bytes of delta chunk payload received from parties.',
    registers: [this.registry],
  });
  readonly uploadTensors = new Counter({
    name: 'dppa_upload_tensors_total',
    help: 'Tensors received completely and spooled.',
    registers: [this.registry],
  });
  readonly uploadsActive = new Gauge({
    name: 'dppa_uploads_active',
    help: 'Upload streams open now.',
    registers: [this.registry],
  });
  readonly jobsPaused = new Gauge({
    name: 'dppa_jobs_paused',
    help: 'Jobs paused by a storage failure (a full disk, an I/O error), waiting to be tried again.',
    registers: [this.registry],
  });
  readonly mergeDuration = new Histogram({
    name: 'dppa_merge_duration_seconds',
    help: 'Duration of completed merges.',
    buckets: [1, 5, 15, 60, 300, 900, 1800, 3600, 7200],
    registers: [this.registry],
  });
  readonly mergeBytes = new Counter({
    name: 'dppa_merge_bytes_total',
    help: 'Bytes of base checkpoint tensors merged (rate() gives merge throughput).',
    registers: [this.registry],
  });
  readonly mergeTensors = new Counter({
    name: 'dppa_merge_tensors_total',
    help: 'Tensors of merged checkpoints written.',
    registers: [this.registry],
  });
  readonly dpaEvaluations = new Counter({
    name: 'dppa_dpa_evaluations_total',
    help: 'Candidates of DPA factor searches scored and recorded (dense references included), by evaluator (remote or onnx).',
    labelNames: ['evaluator'] as const,
    registers: [this.registry],
  });
  readonly dpaEvaluationDuration = new Histogram({
    name: 'dppa_dpa_evaluation_seconds',
    help: 'Time from asking for a candidate\'s scores to having them (remote: waiting for the party included), by evaluator.',
    labelNames: ['evaluator'] as const,
    buckets: [0.01, 0.1, 1, 10, 60, 300, 900, 3600, 14400],
    registers: [this.registry],
  });

  /** @param sources - Read at every scrape for the gauges of jobs and spool. */
  constructor(sources: MetricsSources) {
    new Gauge({
      name: 'dppa_jobs',
      help: 'Jobs known to the server, by state.',
      labelNames: ['state'] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [state, n] of Object.entries(sources.jobsByState())) this.set({ state }, n);
      },
    });
    new Gauge({
      name: 'dppa_spool_bytes',
      help: 'Bytes of uploaded deltas spooled on disk.',
      registers: [this.registry],
      collect() {
        this.set(sources.spoolBytes());
      },
    });
    collectDefaultMetrics({ register: this.registry });
  }
}

/**
 * Metrics of the NATS event publisher, in the server's registry; registered
 * only when the server publishes events to NATS (`--nats`).
 */
export class NatsMetrics {
  readonly published: Counter;
  readonly publishErrors: Counter;

  /**
   * @param registry - The server's registry ({@link Metrics.registry}).
   * @param pending - Read at every scrape: events recorded but not yet acknowledged by JetStream.
   */
  constructor(registry: Registry, pending: () => number) {
    this.published = new Counter({
      name: 'dppa_nats_published_total',
      help: 'Job events published to NATS JetStream and acknowledged (a repeat JetStream dropped as a duplicate counts once).',
      registers: [registry],
    });
    this.publishErrors = new Counter({
      name: 'dppa_nats_publish_errors_total',
      help: 'Publishes of job events to NATS that failed (they are retried).',
      registers: [registry],
    });
    new Gauge({
      name: 'dppa_nats_outbox_pending',
      help: 'Job events recorded but not yet published to NATS.',
      registers: [registry],
      collect() {
        this.set(pending());
      },
    });
  }
}

/**
 * Metrics of a replica's share of the cluster's tasks (`--cluster`), in the
 * server's registry. With `dppa_merge_tensors_total` and
 * `dppa_merge_bytes_total` (which count the tensors this replica merged),
 * they show how the work spreads over the replicas.
 */
export class ClusterMetrics {
  /** Tasks finished by this replica, by kind (`plan`, `tensor`, `commit`) and outcome (`done`, `retried`). */
  readonly tasks: Counter<'kind' | 'outcome'>;
  readonly taskDuration: Histogram<'kind'>;

  /** @param registry - The server's registry ({@link Metrics.registry}). */
  constructor(registry: Registry) {
    this.tasks = new Counter({
      name: 'dppa_cluster_tasks_total',
      help: 'Cluster tasks this replica finished, by kind (plan, tensor, commit) and outcome (done; retried: handed back to the queue after a failure).',
      labelNames: ['kind', 'outcome'] as const,
      registers: [registry],
    });
    this.taskDuration = new Histogram({
      name: 'dppa_cluster_task_seconds',
      help: 'Duration of the cluster tasks this replica finished, by kind.',
      labelNames: ['kind'] as const,
      buckets: [0.001, 0.01, 0.05, 0.25, 1, 5, 30, 120],
      registers: [registry],
    });
  }
}

/** The `/metrics` HTTP listener. */
export class MetricsServer {
  private readonly http: Server;

  /** @param registry - What `/metrics` renders. */
  constructor(registry: Registry) {
    this.http = createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
        return;
      }
      registry.metrics().then(
        (body) => res.writeHead(200, { 'content-type': registry.contentType }).end(body),
        (err: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics collection failed: ${String(err)}\n`),
      );
    });
  }

  /**
   * Starts listening.
   * @returns The port bound (useful when `port` is 0).
   */
  async listen(host: string, port: number): Promise<number> {
    await new Promise<void>((resolveListen, reject) => {
      this.http.once('error', reject);
      this.http.listen(port, host, () => {
        this.http.off('error', reject);
        resolveListen();
      });
    });
    return (this.http.address() as AddressInfo).port;
  }

  /** Stops listening and closes open connections (scrapers keep them alive). */
  async close(): Promise<void> {
    if (!this.http.listening) return;
    const closed = new Promise<void>((r) => this.http.close(() => r()));
    this.http.closeAllConnections();
    await closed;
  }
}
