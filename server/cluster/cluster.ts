/**
 * A replica's connection to the cluster (`--nats URL --cluster`): what the
 * replicas share on NATS JetStream, set up at start.
 *
 * - the KV bucket {@link JOBS_BUCKET}: the jobs (kv-job-store.ts), each job's
 *   event counter (stream-job-events.ts) and merge record (kv-merge-records.ts),
 *   the failure count of tasks that failed (kv-task-failures.ts);
 * - the stream of job events, `DPPA_EVENTS` (docs/events.md), which is the
 *   event log itself;
 * - the work queue {@link TASKS_STREAM} and its two consumers, merge and search (task-queue.ts).
 *
 * Uploads and merged checkpoints live in the data folder, which every
 * replica must mount as the same shared folder.
 */
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import type { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { redactUrl, type NatsOptions } from '../config.js';
import { NatsUnavailableError } from '../errors.js';
import type { Logger } from '../log.js';
import { connectNats, describeNatsError } from '../nats/connection.js';
import { ensureStream } from '../nats/event-publisher.js';
import { EVENTS_STREAM, JOBS_BUCKET, TASKS_STREAM } from '../nats/subjects.js';
import { KvJobStore } from './kv-job-store.js';
import { StreamJobEvents } from './stream-job-events.js';
import { ensureTaskQueue } from './task-queue.js';

/** Options of {@link Cluster.join}. */
export interface ClusterOptions {
  nats: NatsOptions;
  /** The shared data folder. */
  dataDir: string;
  /** Ack wait of the task queue's consumer. */
  taskAckWaitMs: number;
  log: Logger;
}

/** How long a JetStream request may take before it counts as failed. */
const REQUEST_TIMEOUT_MS = 5000;
/** How long the connection may take to drain at stop before it is just closed. */
const DRAIN_TIMEOUT_MS = 5000;

/** This replica's handles on what the replicas share. `join()`, then `leave()`. */
export class Cluster {
  private constructor(
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly jsm: JetStreamManager,
    readonly kv: KV,
    /** The jobs, shared. */
    readonly store: KvJobStore,
    /** The job events, shared. */
    readonly events: StreamJobEvents,
  ) {}

  /**
   * Connects, creates what is missing (bucket, streams, consumer) and loads the jobs.
   * @throws NatsUnavailableError naming the URL if NATS cannot be reached or lacks JetStream.
   */
  static async join(opts: ClusterOptions): Promise<Cluster> {
    const nc = await connectNats(opts.nats, 'dppa-server-replica');
    try {
      const jsm = await jetstreamManager(nc, { timeout: REQUEST_TIMEOUT_MS });
      const js = jetstream(nc, { timeout: REQUEST_TIMEOUT_MS });
      await ensureStream(jsm);
      await ensureTaskQueue(jsm, opts.taskAckWaitMs);
      const kv = await new Kvm(js).create(JOBS_BUCKET, { history: 1 });
      const store = await KvJobStore.open({ kv, dataDir: opts.dataDir, log: opts.log });
      opts.log.info('joined the cluster', {
        url: redactUrl(opts.nats.url),
        bucket: JOBS_BUCKET,
        streams: [EVENTS_STREAM, TASKS_STREAM],
        jobs: store.list().length,
      });
      const state = (jobId: string): JobState | undefined => store.list().find((j) => j.id === jobId)?.state;
      return new Cluster(nc, js, jsm, kv, store, new StreamJobEvents({ js, jsm, kv, state }));
    } catch (cause) {
      await nc.close();
      throw new NatsUnavailableError(
        `NATS at ${redactUrl(opts.nats.url)} cannot hold the cluster's state (JetStream must be enabled: nats-server -js, or jetstream {} in its config): ${redactUrl(describeNatsError(cause))}`,
        { cause },
      );
    }
  }

  /** Stops watching the jobs and closes the connection (draining what is in flight). */
  async leave(): Promise<void> {
    await this.store.close();
    const drained = this.nc.drain().catch(() => undefined);
    const timer = setTimeout(() => void this.nc.close(), DRAIN_TIMEOUT_MS);
    await drained;
    clearTimeout(timer);
  }
}
