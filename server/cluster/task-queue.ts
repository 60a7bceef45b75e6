/**
 * The replicas' work queue: stream {@link TASKS_STREAM} (retention
 * `workqueue`, a task is removed once acknowledged) and, per group of tasks
 * (`merge`, `search`), one durable pull consumer that every replica pulls
 * from; a {@link TaskQueue} is one replica's side of one group.
 *
 * A replica runs `lanes` loops; each pulls one task at a time (a fetch of at
 * most one message), so a replica never holds more tasks than it works on,
 * and the consumer's `max_ack_pending` bounds them over the cluster. A task
 * is acknowledged only after its handler resolved, that is after its result
 * is stored; a long task says `working()` every third of the ack wait. A
 * replica that dies leaves its tasks unacknowledged: JetStream delivers them
 * again to another replica after the ack wait. A handler that fails hands
 * its task back (nak, redelivered after a short delay); a replica that stops
 * hands back what it was doing at once. So a task may run more than once:
 * handlers are idempotent.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  AckPolicy, DeliverPolicy, JetStreamApiCodes, JetStreamApiError, RetentionPolicy, StorageType,
  type Consumer, type JetStreamClient, type JetStreamManager, type JsMsg,
} from '@nats-io/jetstream';
import { nanos } from '@nats-io/transport-node';
import { NatsUnavailableError, UnavailableError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ClusterMetrics } from '../metrics.js';
import { describeNatsError } from '../nats/connection.js';
import {
  TASK_GROUPS, taskGroupSubjects, TASKS_LIMITS, TASKS_STREAM, TASKS_STREAM_SUBJECTS, taskSubject, type TaskGroup, type TaskKind,
} from '../nats/subjects.js';
import { natsCall } from './nats-calls.js';

/** A task on the queue (its JSON payload). */
export interface Task {
  kind: TaskKind;
  jobId: string;
  /** Tensor tasks: the tensor's name and its index among the base's tensors. */
  tensor?: { name: string; index: number };
  /** Search tasks: the party whose factors are searched. */
  party?: string;
}

/** Carries out one task; resolves once its result is stored. Runs again if it throws (or the replica dies). */
export type TaskHandler = (task: Task, signal: AbortSignal) => Promise<void>;

/** Options of {@link TaskQueue}. */
export interface TaskQueueOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The group of tasks this queue pulls (it may publish any). */
  group: TaskGroup;
  /** Tasks this replica works on at once. */
  lanes: number;
  /** The consumer's ack wait: a task in progress says `working()` every third of it. */
  ackWaitMs: number;
  handle: TaskHandler;
  metrics: ClusterMetrics;
  log: Logger;
}

/** How long one pull waits for a task (also how long a stop may wait for an idle lane). */
const PULL_EXPIRES_MS = 2000;
/** A failed task comes back after this long. */
const RETRY_DELAY_MS = 1000;
/** A lane that cannot reach NATS tries again after this long. */
const RECONNECT_WAIT_MS = 1000;

/**
 * Creates the tasks stream and the consumer of each group, or updates the consumers' settings.
 * @param ackWaitMs - A delivered task not acknowledged this long is delivered again.
 */
export async function ensureTaskQueue(jsm: JetStreamManager, ackWaitMs: number): Promise<void> {
  try {
    await jsm.streams.info(TASKS_STREAM);
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)) throw err;
    await jsm.streams.add({
      name: TASKS_STREAM,
      subjects: [TASKS_STREAM_SUBJECTS],
      retention: RetentionPolicy.Workqueue,
      storage: StorageType.File,
      num_replicas: 1,
      duplicate_window: nanos(TASKS_LIMITS.duplicateWindowMs),
    });
  }
  for (const [group, { consumer: name }] of Object.entries(TASK_GROUPS)) {
    const consumer = {
      durable_name: name,
      filter_subject: taskGroupSubjects(group as TaskGroup),
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      ack_wait: nanos(ackWaitMs),
      max_ack_pending: TASKS_LIMITS.maxAckPending,
    };
    try {
      await jsm.consumers.info(TASKS_STREAM, name);
      await jsm.consumers.update(TASKS_STREAM, name, { ack_wait: consumer.ack_wait, max_ack_pending: consumer.max_ack_pending });
    } catch (err) {
      if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound)) throw err;
      await jsm.consumers.add(TASKS_STREAM, consumer);
    }
  }
}

/** This replica's side of the work queue: publishing tasks and working on them. */
export class TaskQueue {
  private readonly stopping = new AbortController();
  private lanes: Promise<void>[] = [];
  private consumer: Consumer | undefined;
  /** True while NATS cannot be reached: logged once per outage. */
  private away = false;

  constructor(private readonly opts: TaskQueueOptions) {}

  /** Starts pulling tasks. */
  start(): void {
    this.lanes = Array.from({ length: this.opts.lanes }, () => this.lane());
  }

  /**
   * Queues a task. JetStream drops a second task with the same `msgId` within
   * {@link TASKS_LIMITS.duplicateWindowMs}.
   * @throws NatsUnavailableError while NATS is away.
   */
  async publish(task: Task, msgId: string): Promise<void> {
    await natsCall('queueing a task', () => this.opts.js.publish(taskSubject(task.jobId, task.kind), JSON.stringify(task), { msgID: msgId }));
  }

  /**
   * Tasks of this kind and job in the queue, delivered or not (acknowledged ones are gone).
   * @throws NatsUnavailableError while NATS is away.
   */
  async queued(jobId: string, kind: TaskKind): Promise<number> {
    const subject = taskSubject(jobId, kind);
    const info = await natsCall('counting tasks', () => this.opts.jsm.streams.info(TASKS_STREAM, { subjects_filter: subject }));
    return info.state.subjects?.[subject] ?? 0;
  }

  private async lane(): Promise<void> {
    const signal = this.stopping.signal;
    while (!signal.aborted) {
      let m: JsMsg | null;
      try {
        this.consumer ??= await this.opts.js.consumers.get(TASKS_STREAM, TASK_GROUPS[this.opts.group].consumer);
        m = await this.consumer.next({ expires: PULL_EXPIRES_MS });
        if (this.away) this.opts.log.info('pulling tasks again', { group: this.opts.group });
        this.away = false;
      } catch (err) {
        if (signal.aborted) return;
        if (!this.away) this.opts.log.warn('cannot pull tasks; retrying until NATS is back', { group: this.opts.group, err: describeNatsError(err) });
        this.away = true;
        await sleep(RECONNECT_WAIT_MS).catch(() => undefined);
        continue;
      }
      if (m !== null) await this.run(m, signal);
    }
  }

  private async run(m: JsMsg, signal: AbortSignal): Promise<void> {
    if (signal.aborted) {
      m.nak();
      return;
    }
    let task: Task;
    try {
      task = m.json<Task>();
    } catch (err) {
      // Not a task of this version: no replica can do anything with it.
      this.opts.log.error('dropping a malformed task', { subject: m.subject, err });
      m.term();
      return;
    }
    const { metrics, log } = this.opts;
    const started = performance.now();
    const heartbeat = setInterval(() => m.working(), this.opts.ackWaitMs / 3);
    try {
      await this.opts.handle(task, signal);
      // Acknowledged for sure, or the task comes back (and is redone: handlers are idempotent).
      await m.ackAck();
      metrics.tasks.inc({ kind: task.kind, outcome: 'done' });
      metrics.taskDuration.observe({ kind: task.kind }, (performance.now() - started) / 1000);
    } catch (err) {
      metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
      if (signal.aborted) {
        m.nak();
        return;
      }
      const fields = { kind: task.kind, jobId: task.jobId, tensor: task.tensor?.name, party: task.party, delivered: m.info.deliveryCount };
      if (err instanceof NatsUnavailableError) log.warn('task handed back: NATS is unavailable', { ...fields, err: err.message });
      else log.error('task failed; handed back', { ...fields, err });
      m.nak(RETRY_DELAY_MS);
    } finally {
      clearInterval(heartbeat);
    }
  }

  /** Stops pulling, hands back the tasks in progress (their handlers see `signal` abort) and waits for the lanes. */
  async stop(): Promise<void> {
    this.stopping.abort(new UnavailableError('the replica is stopping'));
    await Promise.all(this.lanes);
  }
}
