/**
 * The JetStream backend: this server is one replica of several sharing NATS
 * JetStream (cluster/): jobs in a KV bucket, events in the events stream,
 * the searches and the merge as tasks on a work queue, the data folder shared.
 */
import type { ResolvedServerOptions } from '../config.js';
import { Cluster } from '../cluster/cluster.js';
import { KvMergeRecords } from '../cluster/kv-merge-records.js';
import { KvTaskFailures } from '../cluster/kv-task-failures.js';
import { TaskQueue, type TaskHandler } from '../cluster/task-queue.js';
import type { KvJobStore } from '../cluster/kv-job-store.js';
import type { StreamJobEvents } from '../cluster/stream-job-events.js';
import { SearchDriver } from '../dpa/search-driver.js';
import { NatsUnavailableError } from '../errors.js';
import { MergeDriver } from '../merge/merge-driver.js';
import { ClusterMetrics } from '../metrics.js';
import type { Backend, JobSteps, StepDeps } from './backend.js';

/** How often the job runner looks at every unfinished job again. */
const SWEEP_INTERVAL_MS = 5000;

/** Jobs, events and work shared by the replicas on NATS JetStream. */
export class JetStreamBackend implements Backend {
  readonly sharedFolder = true;
  /** A party's evaluation stream reaches one replica, its search may run on another. */
  readonly remoteEvaluators = false;
  readonly sweepMs = SWEEP_INTERVAL_MS;

  private constructor(
    private readonly cluster: Cluster,
    private readonly taskAckWaitMs: number,
  ) {}

  get store(): KvJobStore {
    return this.cluster.store;
  }

  get events(): StreamJobEvents {
    return this.cluster.events;
  }

  /**
   * Joins the cluster: connects, creates what is missing and loads the jobs.
   * @throws NatsUnavailableError naming the URL if NATS cannot be reached or lacks JetStream.
   */
  static async join(
    o: Pick<ResolvedServerOptions, 'nats' | 'dataDir' | 'taskAckWaitMs' | 'logger'>,
  ): Promise<JetStreamBackend> {
    const cluster = await Cluster.join({
      nats: o.nats!,
      dataDir: o.dataDir,
      taskAckWaitMs: o.taskAckWaitMs,
      log: o.logger,
    });
    return new JetStreamBackend(cluster, o.taskAckWaitMs);
  }

  steps(deps: StepDeps): JobSteps {
    const c = this.cluster;
    const { store, events } = this;
    const metrics = new ClusterMetrics(deps.metrics.registry);
    const failures = new KvTaskFailures(c.kv);
    const handle: TaskHandler = (task, signal) =>
      task.kind === 'search' ? search.handle(task, signal) : merge.handle(task, signal);
    const queue = (group: 'merge' | 'search', lanes: number): TaskQueue =>
      new TaskQueue({
        js: c.js,
        jsm: c.jsm,
        group,
        lanes,
        ackWaitMs: this.taskAckWaitMs,
        handle,
        policy: deps.policy,
        failures,
        failed: (task, err) => deps.taskFailed(task.jobId, task.kind === 'search' ? 'DPA search' : 'merge', err),
        ...(deps.taskDone === undefined ? {} : { done: deps.taskDone }),
        metrics,
        log: deps.log,
      });
    // One search at a time per replica, so that the parties' searches spread over the replicas.
    const mergeQueue = queue('merge', MergeDriver.lanes(deps.mergeWorkers));
    const searchQueue = queue('search', 1);
    const merge = new MergeDriver({
      store,
      events,
      ...deps,
      records: new KvMergeRecords(c.kv),
      tasks: () => mergeQueue,
    });
    const search = new SearchDriver({ store, events, ...deps, tasks: () => searchQueue, merge });
    return {
      search,
      merge,
      queued: true,
      start: () => {
        mergeQueue.start();
        searchQueue.start();
      },
      close: async () => {
        // Tasks in progress go back to the queue for the other replicas: stopping the merge threads cuts the tensors short.
        const lanes = Promise.all([mergeQueue.stop(), searchQueue.stop()]);
        await merge.close();
        await lanes;
      },
    };
  }

  /** NATS away passes: a task that met it runs again (a bounded number of times), then its job waits for NATS (never fails for it). */
  transient(err: unknown): boolean {
    return err instanceof NatsUnavailableError;
  }

  /** Stops watching the jobs and leaves the cluster (the events are in the stream already). */
  async close(): Promise<void> {
    await this.events.close();
    await this.cluster.leave();
  }
}
