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
 * again to another replica after the ack wait. A failed task is handed back
 * (nak, with a growing delay) while the failure policy (jobs/failure-policy.ts)
 * allows another run, its failures counted in the bucket (kv-task-failures.ts);
 * past that, the policy's verdict is applied to its job and the task is
 * terminated or handed back as the verdict says. A replica
 * that stops hands back what it was doing at once. So a task may run more
 * than once: handlers are idempotent.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import {
  AckPolicy,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  RetentionPolicy,
  type Consumer,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream';
import { nanos } from '@nats-io/transport-node';
import type { FailurePolicy } from '../jobs/failure-policy.js';
import { UnavailableError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ClusterMetrics } from '../metrics.js';
import { streamInfoOrCreate } from '../nats/streams.js';
import { describeNatsError } from '../nats/connection.js';
import {
  TASK_GROUPS,
  taskGroupSubjects,
  TASKS_LIMITS,
  TASKS_STREAM,
  TASKS_STREAM_SUBJECTS,
  taskSubject,
  type TaskGroup,
  type TaskKind,
} from '../nats/subjects.js';
import {
  TaskNotReadyError,
  type IdentifiedTask,
  type Task,
  type TaskHandler,
  type TaskSink,
} from '../backend/tasks.js';
import type { KvTaskFailures } from './kv-task-failures.js';
import { natsCall } from './nats-calls.js';

export { TaskNotReadyError, type Task, type TaskHandler } from '../backend/tasks.js';

/** Options of {@link TaskQueue}. */
export interface TaskQueueOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The group of tasks this queue pulls (it may publish any). */
  group: TaskGroup;
  /** Tasks this replica works on at once. */
  lanes: number;
  /**
   * The ack wait this replica set on the consumer at start. A task in
   * progress says `working()` every third of the consumer's actual ack wait,
   * read from the consumer (the last replica to start set it); this one until then.
   */
  ackWaitMs: number;
  handle: TaskHandler;
  /** Which failures get another delivery, and after how long. */
  policy: FailurePolicy;
  /** The failure count of each task, shared by the replicas. */
  failures: KvTaskFailures;
  /**
   * A task's failure is final: applies the verdict to its job.
   * @returns After how many ms the task is handed back; undefined: it is terminated.
   */
  failed: (task: Task, err: unknown) => Promise<number | undefined>;
  /** A task that had been handed back (or lost) before succeeded. */
  done?: (jobId: string) => void;
  metrics: ClusterMetrics;
  log: Logger;
}

/** How long one pull waits for a task (also how long a stop may wait for an idle lane). */
const PULL_EXPIRES_MS = 2000;
/** A task whose failure could not be recorded (NATS away) comes back after this long. */
const RETRY_DELAY_MS = 1000;
/** A lane that cannot reach NATS tries again after this long. */
const RECONNECT_WAIT_MS = 1000;
/** The consumer's settings (its ack wait, which a replica starting later may change) are read again this often. */
const CONSUMER_REFRESH_MS = 30_000;

/**
 * Creates the tasks stream and the consumer of each group, or updates the consumers' settings.
 * @param ackWaitMs - A delivered task not acknowledged this long is delivered again.
 */
export async function ensureTaskQueue(jsm: JetStreamManager, ackWaitMs: number): Promise<void> {
  await streamInfoOrCreate(jsm, {
    name: TASKS_STREAM,
    subjects: [TASKS_STREAM_SUBJECTS],
    retention: RetentionPolicy.Workqueue,
    duplicate_window: nanos(TASKS_LIMITS.duplicateWindowMs),
  });
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
      await jsm.consumers.update(TASKS_STREAM, name, {
        ack_wait: consumer.ack_wait,
        max_ack_pending: consumer.max_ack_pending,
      });
    } catch (err) {
      if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound)) throw err;
      await jsm.consumers.add(TASKS_STREAM, consumer);
    }
  }
}

/** This replica's side of the work queue: publishing tasks and working on them. */
export class TaskQueue implements TaskSink {
  private readonly stopping = new AbortController();
  private lanes: Promise<void>[] = [];
  private consumer: Consumer | undefined;
  /** A third of the consumer's ack wait, as read when the consumer was fetched. */
  private heartbeatMs: number;
  /** When the consumer was fetched (performance.now()). */
  private fetchedAt = 0;
  /** True while NATS cannot be reached: logged once per outage. */
  private away = false;

  constructor(private readonly opts: TaskQueueOptions) {
    this.heartbeatMs = opts.ackWaitMs / 3;
  }

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
    await natsCall('queueing a task', () =>
      this.opts.js.publish(taskSubject(task.jobId, task.kind), JSON.stringify(task), { msgID: msgId }),
    );
  }

  /** Queues tasks one after the other ({@link publish}); their outcome is the replicas' business. */
  async submit(tasks: readonly IdentifiedTask[]): Promise<void> {
    for (const { task, id } of tasks) await this.publish(task, id);
  }

  /**
   * Tasks of this kind and job in the queue, delivered or not (acknowledged ones are gone).
   * @throws NatsUnavailableError while NATS is away.
   */
  async queued(jobId: string, kind: TaskKind): Promise<number> {
    const subject = taskSubject(jobId, kind);
    const info = await natsCall('counting tasks', () =>
      this.opts.jsm.streams.info(TASKS_STREAM, { subjects_filter: subject }),
    );
    return info.state.subjects?.[subject] ?? 0;
  }

  private async lane(): Promise<void> {
    const signal = this.stopping.signal;
    while (!signal.aborted) {
      let m: JsMsg | null;
      try {
        if (this.consumer === undefined || performance.now() - this.fetchedAt > CONSUMER_REFRESH_MS)
          this.consumer = await this.fetchConsumer();
        m = await this.consumer.next({ expires: PULL_EXPIRES_MS });
        if (this.away) this.opts.log.info('pulling tasks again', { group: this.opts.group });
        this.away = false;
      } catch (err) {
        if (signal.aborted) return;
        // Fetched again (with its settings) once NATS is back.
        this.consumer = undefined;
        if (!this.away)
          this.opts.log.warn('cannot pull tasks; retrying until NATS is back', {
            group: this.opts.group,
            err: describeNatsError(err),
          });
        this.away = true;
        await sleep(RECONNECT_WAIT_MS).catch(() => undefined);
        continue;
      }
      if (m !== null) await this.run(m, signal);
    }
  }

  /**
   * The group's consumer; the heartbeat follows its actual ack wait, which
   * the last replica to start set (possibly another `--task-ack-wait-ms`).
   */
  private async fetchConsumer(): Promise<Consumer> {
    const consumer = await this.opts.js.consumers.get(TASKS_STREAM, TASK_GROUPS[this.opts.group].consumer);
    const ackWaitNanos = (await consumer.info(true)).config.ack_wait;
    this.fetchedAt = performance.now();
    if (ackWaitNanos !== undefined && ackWaitNanos > 0) {
      const ackWaitMs = ackWaitNanos / 1e6;
      if (ackWaitMs / 3 !== this.heartbeatMs && ackWaitMs !== this.opts.ackWaitMs) {
        this.opts.log.info('the task consumer has another ack wait than this replica set; following it', {
          group: this.opts.group,
          ackWaitMs,
          ours: this.opts.ackWaitMs,
        });
      }
      this.heartbeatMs = ackWaitMs / 3;
    }
    return consumer;
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
      await this.terminate(m, 'malformed task', { subject: m.subject });
      return;
    }
    const { metrics, log, policy } = this.opts;
    const started = performance.now();
    const heartbeat = setInterval(() => m.working(), this.heartbeatMs);
    try {
      await this.opts.handle(task, signal);
      // Acknowledged for sure, or the task comes back (and is redone: handlers are idempotent).
      await m.ackAck();
      metrics.tasks.inc({ kind: task.kind, outcome: 'done' });
      metrics.taskDuration.observe({ kind: task.kind }, (performance.now() - started) / 1000);
      // A task that came back and now succeeded: what held its job up (a full disk) has passed; only such a
      // task may have a failure count.
      if (m.info.redelivered) {
        this.opts.done?.(task.jobId);
        await this.forget(task);
      }
    } catch (err) {
      if (signal.aborted) {
        metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
        m.nak();
        return;
      }
      const fields = { kind: task.kind, jobId: task.jobId, tensor: task.tensor?.name, party: task.party };
      if (err instanceof TaskNotReadyError) {
        metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
        log.info('task handed back: not ready yet', { ...fields, reason: err.message });
        m.nak(err.delayMs);
        return;
      }
      // Only a run the policy may repeat counts against --task-attempts (not a paused job's, not a party's).
      const kind = policy.kind(err);
      let attempt = m.info.deliveryCount;
      if (kind === 'transient' || kind === 'unexpected') {
        try {
          attempt = await this.opts.failures.add(task);
        } catch (e) {
          metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
          log.warn('cannot count a failed task; handed back', { ...fields, err, countErr: describeNatsError(e) });
          m.nak(RETRY_DELAY_MS);
          return;
        }
      }
      Object.assign(fields, { attempt });
      if (policy.retries(err, attempt)) {
        metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
        const delayMs = policy.retryDelayMs(attempt);
        log[kind === 'transient' ? 'warn' : 'error']('task failed; handed back', {
          ...fields,
          of: policy.taskAttempts,
          delayMs,
          err,
        });
        m.nak(delayMs);
        return;
      }
      await this.settle(m, task, attempt, policy.final(err, attempt), fields);
    } finally {
      clearInterval(heartbeat);
    }
  }

  /** Applies the verdict on a task's final failure to its job; terminates the task or hands it back as it says. */
  private async settle(
    m: JsMsg,
    task: Task,
    attempt: number,
    err: unknown,
    fields: Record<string, unknown>,
  ): Promise<void> {
    const { metrics, log, policy } = this.opts;
    let handBackMs: number | undefined;
    try {
      handBackMs = await this.opts.failed(task, err);
    } catch (e) {
      // The job could not be moved (NATS away): the task comes back and its failure is settled then.
      metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
      log.warn('cannot record a failed task; handed back', { ...fields, err: e });
      m.nak(RETRY_DELAY_MS);
      return;
    }
    if (handBackMs !== undefined) {
      // Within the task's own backoff: a paused job's task finds the room freed soon after it is.
      metrics.tasks.inc({ kind: task.kind, outcome: 'retried' });
      m.nak(Math.min(handBackMs, policy.retryDelayMs(attempt)));
      return;
    }
    metrics.tasks.inc({ kind: task.kind, outcome: 'failed' });
    log.error('task failed for good; its job failed or moved on', { ...fields, err });
    await this.terminate(m, err instanceof Error ? err.message : String(err), fields);
    await this.forget(task);
  }

  /** Terminates a task and removes it: a work queue keeps a terminated message (an acknowledged one is removed). */
  private async terminate(m: JsMsg, reason: string, fields: Record<string, unknown>): Promise<void> {
    m.term(reason);
    await this.opts.jsm.streams
      .deleteMessage(TASKS_STREAM, m.seq, false)
      .catch((e: unknown) =>
        this.opts.log.warn('cannot remove a terminated task', { ...fields, err: describeNatsError(e) }),
      );
  }

  /** Removes a task's failure count (left behind if NATS is away: a task run again starts from it). */
  private async forget(task: Task): Promise<void> {
    await this.opts.failures
      .clear(task)
      .catch((e: unknown) =>
        this.opts.log.warn('cannot remove a task failure count', { jobId: task.jobId, err: describeNatsError(e) }),
      );
  }

  /** Stops pulling, hands back the tasks in progress (their handlers see `signal` abort) and waits for the lanes. */
  async stop(): Promise<void> {
    this.stopping.abort(new UnavailableError('the replica is stopping'));
    await Promise.all(this.lanes);
  }
}
