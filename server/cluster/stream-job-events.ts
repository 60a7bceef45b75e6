/**
 * Job events with `--cluster`: the JetStream stream of job events
 * (`DPPA_EVENTS`, docs/events.md) is the log itself, shared by every
 * replica, so that WatchJob on any replica sees what every replica recorded.
 *
 * Each event's number comes from the job's counter in the KV bucket
 * (`seq.<jobId>`, incremented against its revision), so numbers stay unique
 * per job whichever replica appends (a replica dying between numbering and
 * publishing leaves a gap); the event is then
 * published with `Nats-Msg-Id: <jobId>-<seq>` and awaited. Two replicas
 * appending at the same instant may store their events in the stream in the
 * other order than their numbers; watchers deliver stream order and skip
 * numbers already delivered. Appending needs NATS: while it is away an append
 * fails with NatsUnavailableError, and the work that wanted it is retried.
 *
 * A job's state and its final event are two writes: the state (KV) first,
 * then the event, and a MERGED job's uploads are deleted in between. A
 * replica dying or NATS going away in between leaves a job MERGED without its
 * `merged` event until a commit task that runs again publishes it
 * ({@link StreamJobEvents.hasFinalEvent}): a watch of a MERGED job waits for
 * `merged` however late it comes (unless the stream holds no event of the job
 * at all: expired). A lost `failed` is not published again: a watch of a
 * FAILED job also ends once the stream holds no event of it that the watch
 * has not seen.
 */
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import type { KV } from '@nats-io/kv';
import { JobEvent, JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { isFinalEvent, type EventBody, type JobEvents } from '../jobs/job-events.js';
import { EVENTS_STREAM, eventKind, eventMsgId, eventSeqKey, eventSubject, jobSubjects } from '../nats/subjects.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';

/** Options of {@link StreamJobEvents}. */
export interface StreamJobEventsOptions {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The jobs bucket, holding each job's event counter. */
  kv: KV;
  /**
   * The job's state in the store. A watch of a FAILED job may end without its `failed` event, which is not
   * published again if lost; one of a MERGED job only when the stream holds none of its events (expired): its
   * `merged` event may come seconds after the state (the uploads are deleted in between; a lost one is published
   * again by a commit task).
   */
  state: (jobId: string) => JobState | undefined;
  /** How often an idle watch checks whether its job has failed. @default 1000 */
  idleCheckMs?: number;
}

/** Messages a watcher's consumer buffers. */
const WATCH_BUFFER = 256;
/** Idle checks in a row that must find the job failed and every event of it seen before a watch without a final event ends. */
const SETTLE_CHECKS = 2;

/** The events of every job, in the shared stream. */
export class StreamJobEvents implements JobEvents {
  private watchers = 0;

  constructor(private readonly opts: StreamJobEventsOptions) {}

  /** Nothing to open: the stream holds every job's events. */
  load(): Promise<void> {
    return Promise.resolve();
  }

  /** Nothing to close. */
  unload(): Promise<void> {
    return Promise.resolve();
  }

  /** @throws NatsUnavailableError while NATS is away. */
  async append(jobId: string, body: EventBody): Promise<JobEvent> {
    const seq = await this.nextSeq(jobId);
    const event = JobEvent.fromPartial({ ...body, jobId, seq, time: new Date().toISOString() });
    const kind = eventKind(event);
    if (kind === undefined) throw new Error('an event must have exactly one kind');
    await natsCall('publishing a job event', () =>
      this.opts.js.publish(eventSubject(jobId, kind), JSON.stringify(JobEvent.toJSON(event)), {
        msgID: eventMsgId(jobId, seq),
      }),
    );
    return event;
  }

  /** The job's next event number, taken from its counter. */
  private async nextSeq(jobId: string): Promise<bigint> {
    const key = eventSeqKey(jobId);
    const { kv } = this.opts;
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading an event counter', () => kv.get(key));
      const last = entry?.operation === 'PUT' ? BigInt(entry.string()) : 0n;
      const next = last + 1n;
      try {
        if (entry === null) await natsCall('creating an event counter', () => kv.create(key, String(next)));
        else await natsCall('updating an event counter', () => kv.update(key, String(next), entry.revision));
        return next;
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** @throws NatsUnavailableError if NATS is away when the watch starts (it then follows NATS through outages). */
  async *watch(jobId: string, afterSeq: bigint, signal: AbortSignal): AsyncGenerator<JobEvent, void, undefined> {
    signal.throwIfAborted();
    // An ordered consumer: replays the job's subjects from the start, recreates itself after an outage.
    const consumer = await natsCall('watching job events', () =>
      this.opts.js.consumers.get(EVENTS_STREAM, { filter_subjects: jobSubjects(jobId) }),
    );
    const messages = await natsCall('watching job events', () => consumer.consume({ max_messages: WATCH_BUFFER }));
    const onAbort = (): void => void messages.close();
    signal.addEventListener('abort', onAbort);
    this.watchers++;
    const delivered = new Set<bigint>();
    // A job that failed without its `failed` event (lost between its KV write and its publish) would hold the watch
    // forever: once the job has failed and the stream holds nothing more of it, for a few checks in a row, it ends.
    // So does a MERGED job's once the stream holds no event of it at all (expired: the stream's age and size limits).
    let received = 0;
    let receivedAtCheck = -1;
    let quiet = 0;
    let checking = false;
    let settled = false;
    const check = async (): Promise<void> => {
      const state = this.opts.state(jobId);
      if (
        received !== receivedAtCheck ||
        (state !== JobState.JOB_STATE_FAILED && state !== JobState.JOB_STATE_MERGED)
      ) {
        receivedAtCheck = received;
        quiet = 0;
        return;
      }
      const count = await this.eventCount(jobId);
      if (count > received || (state === JobState.JOB_STATE_MERGED && count > 0)) {
        quiet = 0;
        return;
      }
      if (++quiet >= SETTLE_CHECKS && received === receivedAtCheck) {
        settled = true;
        await messages.close();
      }
    };
    const idle = setInterval(() => {
      if (checking) return;
      checking = true;
      // NATS away: the next check tries again.
      check()
        .catch(() => undefined)
        .finally(() => (checking = false));
    }, this.opts.idleCheckMs ?? 1000);
    try {
      for await (const m of messages) {
        received++;
        const e = JobEvent.fromJSON(m.json());
        if (e.seq <= afterSeq) {
          if (isFinalEvent(e)) return;
          continue;
        }
        if (delivered.has(e.seq)) continue;
        delivered.add(e.seq);
        yield e;
        if (isFinalEvent(e)) return;
      }
      if (settled) return;
      signal.throwIfAborted();
    } finally {
      clearInterval(idle);
      this.watchers--;
      signal.removeEventListener('abort', onAbort);
      await messages.close();
    }
  }

  /** Events of the job in the stream. @throws NatsUnavailableError while NATS is away. */
  private async eventCount(jobId: string): Promise<number> {
    const subjects = await this.subjectCounts(jobId);
    return Object.values(subjects).reduce((n, c) => n + c, 0);
  }

  private async subjectCounts(jobId: string): Promise<Record<string, number>> {
    const info = await natsCall('counting job events', () =>
      this.opts.jsm.streams.info(EVENTS_STREAM, { subjects_filter: jobSubjects(jobId) }),
    );
    return info.state.subjects ?? {};
  }

  /**
   * True when the stream holds a `merged` or `failed` event of the job.
   * @throws NatsUnavailableError while NATS is away.
   */
  async hasFinalEvent(jobId: string): Promise<boolean> {
    const subjects = await this.subjectCounts(jobId);
    return (subjects[eventSubject(jobId, 'merged')] ?? 0) + (subjects[eventSubject(jobId, 'failed')] ?? 0) > 0;
  }

  get watcherCount(): number {
    return this.watchers;
  }

  /** Nothing to flush: every append was acknowledged by JetStream before it resolved. */
  close(): Promise<void> {
    return Promise.resolve();
  }
}
