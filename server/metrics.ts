/**
 * Prometheus metrics of the server in a registry of its own, with fixed label sets, and the HTTP endpoint that
 * serves them. See docs/design/rpc.md.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { status as Code } from '@grpc/grpc-js';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

/** Reads values that live elsewhere at scrape time. */
export interface MetricsSources {
  /** Number of jobs per state name. */
  jobsByState(): Record<string, number>;
  /** Bytes of upload spool on disk. */
  spoolBytes(): number;
  /** Free and total bytes of the file system holding the data folder. */
  dataDisk(): Promise<{ freeBytes: number; sizeBytes: number }>;
}

/** The kind of a gRPC call, as the grpc-ecosystem metrics name it. */
export type GrpcType = 'unary' | 'client_stream' | 'server_stream' | 'bidi_stream';

/** Status code names as grpc-go spells them (the `grpc_code` label of the grpc-ecosystem metrics), by code. */
const GRPC_CODES = [
  'OK',
  'Canceled',
  'Unknown',
  'InvalidArgument',
  'DeadlineExceeded',
  'NotFound',
  'AlreadyExists',
  'PermissionDenied',
  'ResourceExhausted',
  'FailedPrecondition',
  'Aborted',
  'OutOfRange',
  'Unimplemented',
  'Internal',
  'Unavailable',
  'DataLoss',
  'Unauthenticated',
];

/** What one gRPC call records: its messages and its end. */
export interface RpcCallMetrics {
  /** A message came from the caller. */
  received(): void;
  /** A message went to the caller. */
  sent(): void;
  /** The call ended with `code`; records its duration. */
  handled(code: Code): void;
}

/** Labels of the grpc-ecosystem metrics. */
type GrpcLabel = 'grpc_type' | 'grpc_service' | 'grpc_method';

/** Every metric the server exports. */
export class Metrics {
  /** The registry the metrics live in; `metrics()` renders it. */
  readonly registry = new Registry();
  // The gRPC server metrics under go-grpc-middleware's names and labels, so that stock gRPC dashboards and alerts work.
  private readonly grpcStarted = new Counter<GrpcLabel>({
    name: 'grpc_server_started_total',
    help: 'Total number of RPCs started on the server.',
    labelNames: ['grpc_type', 'grpc_service', 'grpc_method'],
    registers: [this.registry],
  });
  private readonly grpcHandled = new Counter<GrpcLabel | 'grpc_code'>({
    name: 'grpc_server_handled_total',
    help: 'Total number of RPCs completed on the server, regardless of success or failure.',
    labelNames: ['grpc_type', 'grpc_service', 'grpc_method', 'grpc_code'],
    registers: [this.registry],
  });
  private readonly grpcHandlingSeconds = new Histogram<GrpcLabel>({
    name: 'grpc_server_handling_seconds',
    help: 'Histogram of response latency (seconds) of gRPC that had been application-level handled by the server (streams: until their status is sent).',
    labelNames: ['grpc_type', 'grpc_service', 'grpc_method'],
    // Uploads, downloads and watches are streams of minutes to hours.
    buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, 1800, 7200],
    registers: [this.registry],
  });
  private readonly grpcMsgReceived = new Counter<GrpcLabel>({
    name: 'grpc_server_msg_received_total',
    help: 'Total number of RPC stream messages received on the server.',
    labelNames: ['grpc_type', 'grpc_service', 'grpc_method'],
    registers: [this.registry],
  });
  private readonly grpcMsgSent = new Counter<GrpcLabel>({
    name: 'grpc_server_msg_sent_total',
    help: 'Total number of gRPC stream messages sent by the server.',
    labelNames: ['grpc_type', 'grpc_service', 'grpc_method'],
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
  readonly securePhaseSeconds = new Histogram({
    name: 'dppa_secure_phase_seconds',
    help: 'Time a phase of a secure job was open, by phase (support, keys, shares, masked_input, unmask).',
    labelNames: ['phase'] as const,
    buckets: [0.1, 1, 10, 60, 300, 900, 3600],
    registers: [this.registry],
  });
  readonly secureBytes = new Counter({
    name: 'dppa_secure_bytes_total',
    help: 'Bytes received for secure jobs, by phase (keys, shares, masked_input, unmask; supports count in dppa_upload_bytes_total).',
    labelNames: ['phase'] as const,
    registers: [this.registry],
  });
  readonly secureClipped = new Counter({
    name: 'dppa_secure_clipped_values_total',
    help: 'Values the parties of secure jobs clipped to the clip bound, as they reported them (counted when MASKED_INPUT closes, over U3).',
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
    help: "Time from asking for a candidate's scores to having them (remote: waiting for the party included), by evaluator.",
    labelNames: ['evaluator'] as const,
    buckets: [0.01, 0.1, 1, 10, 60, 300, 900, 3600, 14400],
    registers: [this.registry],
  });
  readonly dpaEvaluationFailures = new Counter({
    name: 'dppa_dpa_evaluation_failures_total',
    help: 'Candidates of DPA factor searches whose scoring failed (the party reported an error or timed out, the ONNX evaluator failed), by evaluator.',
    labelNames: ['evaluator'] as const,
    registers: [this.registry],
  });
  readonly dpaDomainRatio = new Histogram({
    name: 'dppa_dpa_domain_ratio',
    help: 'Domain-Ratio (the search score: candidate score over the dense fine-tuned score) of each amplified candidate evaluated, by evaluator.',
    labelNames: ['evaluator'] as const,
    buckets: [0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1, 1.05, 1.1, 1.25, 1.5],
    registers: [this.registry],
  });

  /**
   * @param sources - Read at every scrape for the gauges of jobs, spool and disk.
   * @param build - What `dppa_build_info` says besides the Node version.
   */
  constructor(sources: MetricsSources, build: { version: string; commit: string }) {
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
    new Gauge({
      name: 'dppa_data_disk_free_bytes',
      help: 'Bytes free for the server on the file system of its data folder.',
      registers: [this.registry],
      async collect() {
        this.set((await sources.dataDisk()).freeBytes);
      },
    });
    new Gauge({
      name: 'dppa_data_disk_size_bytes',
      help: 'Size in bytes of the file system of the data folder.',
      registers: [this.registry],
      async collect() {
        this.set((await sources.dataDisk()).sizeBytes);
      },
    });
    new Gauge({
      name: 'dppa_build_info',
      help: 'Always 1; the labels say which build of the server runs.',
      labelNames: ['version', 'commit', 'node_version'] as const,
      registers: [this.registry],
    }).set({ version: build.version, commit: build.commit, node_version: process.version }, 1);
    collectDefaultMetrics({ register: this.registry });
    // Gauges named like counters (promtool check metrics flags them); the sum by type of nodejs_active_{handles,requests,resources} says the same.
    for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'])
      this.registry.removeSingleMetric(name);
  }

  /**
   * Starts recording one gRPC call (`grpc_server_started_total`; the handling time runs from here).
   * @param path - `package.Service/Method`, e.g. `dppa.v1.JobService/CreateJob`.
   */
  startRpc(type: GrpcType, path: string): RpcCallMetrics {
    const slash = path.lastIndexOf('/');
    const labels = { grpc_type: type, grpc_service: path.slice(0, slash), grpc_method: path.slice(slash + 1) };
    this.grpcStarted.inc(labels);
    const endTimer = this.grpcHandlingSeconds.startTimer(labels);
    return {
      received: () => this.grpcMsgReceived.inc(labels),
      sent: () => this.grpcMsgSent.inc(labels),
      handled: (code) => {
        endTimer();
        this.grpcHandled.inc({ ...labels, grpc_code: GRPC_CODES[code] ?? String(code) });
      },
    };
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
  /** Tasks finished by this replica, by kind (`plan`, `tensor`, `commit`, `search`) and outcome (`done`, `retried`, `failed`). */
  readonly tasks: Counter<'kind' | 'outcome'>;
  readonly taskDuration: Histogram<'kind'>;

  /** @param registry - The server's registry ({@link Metrics.registry}). */
  constructor(registry: Registry) {
    this.tasks = new Counter({
      name: 'dppa_cluster_tasks_total',
      help: 'Cluster tasks this replica finished, by kind (plan, tensor, commit, search) and outcome (done; retried: handed back to the queue after a failure; failed: terminated once its job failed or moved on, its attempts spent or its input unusable).',
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
        (err: unknown) =>
          res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics collection failed: ${String(err)}\n`),
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
