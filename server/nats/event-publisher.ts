/**
 * The NATS outbox: publishes every job event to JetStream exactly once and in order, reading from the job's event
 * log, without ever making an RPC wait for NATS. See docs/design/events.md.
 */
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  DiscardPolicy,
  jetstream,
  jetstreamManager,
  RetentionPolicy,
  type JetStreamClient,
  type JetStreamManager,
} from '@nats-io/jetstream';
import { nanos, type NatsConnection } from '@nats-io/transport-node';
import type { Registry } from 'prom-client';
import { JobEvent } from '../../proto/gen/dppa/v1/jobs.js';
import { redactUrl, type NatsOptions } from '../config.js';
import { connectNats, describeNatsError } from './connection.js';
import { TEMP_MARK, writeFileDurably } from '../durable-write.js';
import { NatsUnavailableError } from '../errors.js';
import { isFinalEvent, type FileJobEvents } from '../jobs/job-events.js';
import type { Logger } from '../log.js';
import { NatsMetrics } from '../metrics.js';
import { streamInfoOrCreate } from './streams.js';
import {
  EVENTS_STREAM,
  EVENTS_STREAM_LIMITS,
  EVENTS_STREAM_SUBJECTS,
  eventKind,
  eventMsgId,
  eventSubject,
  jobSubjects,
  seqOfMsgId,
} from './subjects.js';

/** Options of {@link NatsEventPublisher.start}. */
export interface NatsEventPublisherOptions extends NatsOptions {
  /** The event logs; the publisher listens to their appends and reads events from them. */
  events: FileJobEvents;
  /** Ids of the jobs whose logs are loaded: their events not yet published are published first. */
  jobIds: readonly string[];
  /** Folder of a job, where its `nats-published.json` lives. */
  jobDir(jobId: string): string;
  /** The server's metrics registry, where the publisher's metrics are registered. */
  registry: Registry;
  log: Logger;
}

/** Options of {@link NatsEventPublisher.stop}. */
export interface PublisherStopOptions {
  /** While connected, keep publishing what is pending for up to this long before closing. @default 0 */
  flushMs?: number;
}

/** How long a publish waits for JetStream's acknowledgement before it counts as failed (and is retried). */
const PUBLISH_TIMEOUT_MS = 5000;
/** Retry backoff after a failed publish: doubles from the first value up to the second, ±20 % jitter. */
const BACKOFF_MIN_MS = 200;
const BACKOFF_MAX_MS = 5000;
/** Events of one job published before the loop turns to the next job with pending events. */
const BATCH = 64;
/** A busy job's cursor is saved at most this often (a crash in between costs a look-up at the stream, not a duplicate). */
const SAVE_INTERVAL_MS = 1000;
/** How long a drain of the connection may take at stop before the connection is just closed. */
const DRAIN_TIMEOUT_MS = 5000;
/** The per-job file holding the last sequence number JetStream acknowledged. */
const CURSOR_FILE = 'nats-published.json';
const CURSOR_VERSION = 1;

/** The outbox's state of one job. */
interface Cursor {
  jobId: string;
  /** Last event known to be in the stream. */
  published: bigint;
  /** Last event written to the job's log. */
  written: bigint;
  /** Last value saved in the job's cursor file. */
  saved: bigint;
  /** `Date.now()` of the last save. */
  savedAt: number;
  /** Ask the stream for the job's last message before publishing (after a failure or a restart). */
  reconcile: boolean;
}

/** Publishes every job event to NATS JetStream. `start()` it, then `stop()` it. */
export class NatsEventPublisher {
  private readonly cursors = new Map<string, Cursor>();
  /** Jobs with events to publish, in the order the loop serves them (a served job goes to the back). */
  private readonly due = new Set<string>();
  /** Jobs whose cursor changed since it was last saved. */
  private readonly dirty = new Set<string>();
  private readonly metrics: NatsMetrics;
  private readonly log: Logger;
  private connected = true;
  private stopping = false;
  private flushDeadline = 0;
  /** Make sure the stream exists before the next publish (it may have been deleted while a publish failed). */
  private checkStream = false;
  /** The loop's wait ends early when this is called. */
  private wakeUp: (() => void) | undefined;
  private unsubscribe: (() => void) | undefined;
  private loop: Promise<void> = Promise.resolve();
  private statusLoop: Promise<void> = Promise.resolve();
  private stopped: Promise<void> | undefined;

  private constructor(
    private readonly opts: NatsEventPublisherOptions,
    private readonly nc: NatsConnection,
    private readonly jsm: JetStreamManager,
    private readonly js: JetStreamClient,
  ) {
    this.log = opts.log;
    this.metrics = new NatsMetrics(opts.registry, () => this.pending());
  }

  /**
   * Connects to NATS, creates or updates the events stream, and starts
   * publishing the events of `jobIds` that were not published yet, then every
   * event appended from now on.
   * @throws NatsUnavailableError naming the URL if NATS cannot be reached or has no JetStream.
   * @throws ConfigError if the credentials file cannot be read.
   */
  static async start(opts: NatsEventPublisherOptions): Promise<NatsEventPublisher> {
    const cursors: Cursor[] = [];
    for (const jobId of opts.jobIds) {
      const saved = await loadCursor(opts.jobDir(jobId), opts.log);
      const written = opts.events.lastSeq(jobId);
      const published = saved < written ? saved : written;
      // Events may have been published after the cursor was last saved: ask the stream before publishing them again.
      cursors.push({ jobId, published, written, saved, savedAt: 0, reconcile: published < written });
    }
    const nc = await connectNats(opts, 'dppa-server');
    let jsm: JetStreamManager;
    try {
      jsm = await jetstreamManager(nc, { timeout: PUBLISH_TIMEOUT_MS });
      await ensureStream(jsm);
    } catch (cause) {
      await nc.close();
      throw new NatsUnavailableError(
        `NATS at ${redactUrl(opts.url)} cannot hold the job events in stream ${EVENTS_STREAM} (JetStream must be enabled: nats-server -js, or jetstream {} in its config): ${redactUrl(describeNatsError(cause))}`,
        { cause },
      );
    }
    const p = new NatsEventPublisher(opts, nc, jsm, jetstream(nc, { timeout: PUBLISH_TIMEOUT_MS }));
    p.statusLoop = p.watchStatus();
    void nc.closed().then((err) => {
      p.connected = false;
      if (!p.stopping)
        opts.log.error(
          'the NATS connection closed for good; job events are no longer published until the server restarts',
          { err },
        );
    });
    for (const c of cursors) {
      p.cursors.set(c.jobId, c);
      if (c.published < c.written) p.due.add(c.jobId);
    }
    p.unsubscribe = opts.events.onAppended((e) => p.appended(e));
    p.loop = p.run().catch((err: unknown) => opts.log.error('the NATS publisher stopped unexpectedly', { err }));
    opts.log.info('publishing job events to NATS', {
      url: redactUrl(opts.url),
      stream: EVENTS_STREAM,
      pending: p.pending(),
    });
    return p;
  }

  /** Events written to the job logs but not yet acknowledged by JetStream. */
  pending(): number {
    let n = 0n;
    for (const jobId of this.due) {
      const c = this.cursors.get(jobId);
      if (c !== undefined && c.written > c.published) n += c.written - c.published;
    }
    return Number(n);
  }

  /**
   * Stops publishing (see {@link PublisherStopOptions}), saves every job's
   * cursor and drains the connection. What is still pending is published at
   * the next start. Calling it again waits for the same stop.
   */
  stop(opts: PublisherStopOptions = {}): Promise<void> {
    this.stopped ??= this.shutdown(opts.flushMs ?? 0);
    return this.stopped;
  }

  private async shutdown(flushMs: number): Promise<void> {
    this.stopping = true;
    this.flushDeadline = Date.now() + flushMs;
    this.unsubscribe?.();
    this.wakeUp?.();
    let timer: NodeJS.Timeout | undefined;
    // A publish in flight normally has its answer within milliseconds; one second more before cutting it off.
    const overtime = await Promise.race([
      this.loop.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), flushMs + 1000))),
    ]);
    clearTimeout(timer);
    if (overtime || !this.connected) {
      // Closing fails a publish still waiting for its acknowledgement; it is retried (and deduplicated) at the next start.
      await this.nc.close();
      await this.loop;
    } else {
      await this.drain();
    }
    await this.saveDirty(true);
    await this.statusLoop;
    this.log.info('stopped publishing job events to NATS', { pending: this.pending() });
  }

  private async drain(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        this.nc.drain(),
        new Promise(
          (_resolve, reject) => (timer = setTimeout(() => reject(new Error('drain timed out')), DRAIN_TIMEOUT_MS)),
        ),
      ]);
    } catch (err) {
      this.log.warn('cannot drain the NATS connection; closing it', { err });
      if (!this.nc.isClosed()) await this.nc.close();
    } finally {
      clearTimeout(timer);
    }
  }

  /** Listener of JobEvents: notes the event and wakes the loop; never blocks the appender. */
  private appended(e: JobEvent): void {
    let c = this.cursors.get(e.jobId);
    if (c === undefined) {
      // A job created since start: nothing of it can be in the stream yet.
      c = { jobId: e.jobId, published: 0n, written: 0n, saved: 0n, savedAt: 0, reconcile: false };
      this.cursors.set(e.jobId, c);
    }
    if (e.seq > c.written) c.written = e.seq;
    this.due.add(e.jobId);
    this.wakeUp?.();
  }

  /** Follows the connection's state: the loop waits while disconnected and resumes at reconnection. */
  private async watchStatus(): Promise<void> {
    for await (const s of this.nc.status()) {
      if (s.type === 'disconnect') {
        this.connected = false;
        if (!this.stopping)
          this.log.warn('lost the connection to NATS; job events wait in the outbox', { server: s.server });
      } else if (s.type === 'reconnect') {
        this.connected = true;
        this.log.info('reconnected to NATS; publishing pending job events', {
          server: s.server,
          pending: this.pending(),
        });
        this.wakeUp?.();
      }
    }
  }

  private async run(): Promise<void> {
    let backoff = BACKOFF_MIN_MS;
    let failing = false;
    for (;;) {
      const c = this.nextDue();
      if (this.stopping && (c === undefined || !this.connected || Date.now() >= this.flushDeadline)) break;
      if (c === undefined) {
        await this.saveDirty(false);
        // Checked again after the save's await: an append or a stop meanwhile found no sleeper to wake.
        if (this.due.size === 0 && !this.stopping) await this.sleep(this.dirty.size > 0 ? SAVE_INTERVAL_MS : Infinity);
        continue;
      }
      if (!this.connected) {
        // Woken at once by the reconnection; the timeout is a safety net.
        await this.sleep(BACKOFF_MAX_MS);
        continue;
      }
      try {
        await this.publishSome(c);
        if (failing) this.log.info('publishing job events to NATS again', { pending: this.pending() });
        failing = false;
        backoff = BACKOFF_MIN_MS;
      } catch (err) {
        c.reconcile = true;
        this.checkStream = true;
        this.metrics.publishErrors.inc();
        // One warning per outage, not one per retry.
        if (!failing && !this.stopping)
          this.log.warn('cannot publish a job event to NATS; retrying', { jobId: c.jobId, err });
        else this.log.debug('publishing to NATS failed again', { jobId: c.jobId, err });
        failing = true;
        if (this.stopping) break;
        await this.sleep(backoff * (0.8 + 0.4 * Math.random()));
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      }
      await this.saveCursor(c, false);
    }
    await this.saveDirty(true);
  }

  /** The job to serve next (round robin), dropping jobs that have nothing left. */
  private nextDue(): Cursor | undefined {
    for (const jobId of this.due) {
      const c = this.cursors.get(jobId);
      if (c !== undefined && c.published < c.written) return c;
      this.due.delete(jobId);
    }
    return undefined;
  }

  /** Publishes up to {@link BATCH} events of a job, in order, each acknowledged before the next. */
  private async publishSome(c: Cursor): Promise<void> {
    if (this.checkStream) {
      await ensureStream(this.jsm);
      this.checkStream = false;
    }
    if (c.reconcile) {
      const inStream = await this.lastInStream(c.jobId);
      if (inStream > c.published) {
        this.log.info('job events were already in the stream; continuing after them', {
          jobId: c.jobId,
          from: c.published,
          to: inStream,
        });
        if (inStream > c.written)
          this.log.warn('the stream holds events of this job that its log does not', {
            jobId: c.jobId,
            inStream,
            written: c.written,
          });
        c.published = inStream;
        this.dirty.add(c.jobId);
      }
      c.reconcile = false;
    }
    const batch = this.opts.events.recorded(c.jobId, c.published, BATCH);
    if (batch.length === 0) c.published = c.written;
    for (const e of batch) {
      if (e.seq > c.written) break;
      const kind = eventKind(e);
      if (kind === undefined) {
        this.log.warn('not publishing an event of an unknown kind', { jobId: c.jobId, seq: e.seq });
      } else {
        await this.js.publish(eventSubject(c.jobId, kind), JSON.stringify(JobEvent.toJSON(e)), {
          msgID: eventMsgId(c.jobId, e.seq),
          timeout: PUBLISH_TIMEOUT_MS,
        });
        this.metrics.published.inc();
      }
      c.published = e.seq;
      this.dirty.add(c.jobId);
      if (isFinalEvent(e)) c.savedAt = 0;
    }
    // Move the job to the back of the queue so that a busy job does not hold up the others.
    this.due.delete(c.jobId);
    if (c.published < c.written) this.due.add(c.jobId);
  }

  /** Sequence number of the job's last event in the stream; 0 if it holds none. */
  private async lastInStream(jobId: string): Promise<bigint> {
    const m = await this.jsm.streams.getMessage(EVENTS_STREAM, { last_by_subj: jobSubjects(jobId) });
    if (m === null) return 0n;
    const fromId = seqOfMsgId(jobId, m.header?.get('Nats-Msg-Id') ?? '');
    if (fromId !== undefined) return fromId;
    try {
      return JobEvent.fromJSON(m.json()).seq;
    } catch {
      return 0n;
    }
  }

  /** Saves a job's cursor if it changed, at most every {@link SAVE_INTERVAL_MS} unless `force`. */
  private async saveCursor(c: Cursor, force: boolean): Promise<void> {
    if (c.published === c.saved) {
      this.dirty.delete(c.jobId);
      return;
    }
    if (!force && Date.now() - c.savedAt < SAVE_INTERVAL_MS) return;
    const seq = c.published;
    try {
      await writeFileDurably(
        join(this.opts.jobDir(c.jobId), CURSOR_FILE),
        `${JSON.stringify({ version: CURSOR_VERSION, publishedSeq: seq.toString() })}\n`,
      );
      c.saved = seq;
      c.savedAt = Date.now();
      if (c.published === c.saved) this.dirty.delete(c.jobId);
    } catch (err) {
      // Not fatal: at the next start the stream is asked where the job stands.
      this.log.warn('cannot save the NATS cursor of a job', { jobId: c.jobId, err });
    }
  }

  private async saveDirty(force: boolean): Promise<void> {
    for (const jobId of [...this.dirty]) {
      const c = this.cursors.get(jobId);
      if (c === undefined) this.dirty.delete(jobId);
      else await this.saveCursor(c, force);
    }
  }

  /** Waits `ms` or until woken (an append, a reconnection, a stop). */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.wakeUp = undefined;
        resolve();
      };
      const timer = Number.isFinite(ms) ? setTimeout(done, ms) : undefined;
      this.wakeUp = done;
    });
  }
}

/** Creates the events stream, or updates its subjects and limits (subjects.ts) when they differ, keeping what an operator set otherwise (replicas, placement…). */
export async function ensureStream(jsm: JetStreamManager): Promise<void> {
  const limits = {
    max_age: nanos(EVENTS_STREAM_LIMITS.maxAgeMs),
    max_bytes: EVENTS_STREAM_LIMITS.maxBytes,
    duplicate_window: nanos(EVENTS_STREAM_LIMITS.duplicateWindowMs),
    discard: DiscardPolicy.Old,
  };
  const existing = await streamInfoOrCreate(jsm, {
    name: EVENTS_STREAM,
    subjects: [EVENTS_STREAM_SUBJECTS],
    retention: RetentionPolicy.Limits,
    ...limits,
  });
  if (existing === undefined) return;
  const subjects = existing.config.subjects ?? [];
  const config = existing.config;
  const same =
    subjects.includes(EVENTS_STREAM_SUBJECTS) &&
    config.max_age === limits.max_age &&
    config.max_bytes === limits.max_bytes &&
    config.duplicate_window === limits.duplicate_window &&
    config.discard === limits.discard;
  if (same) return;
  await jsm.streams.update(EVENTS_STREAM, {
    ...config,
    subjects: subjects.includes(EVENTS_STREAM_SUBJECTS) ? subjects : [...subjects, EVENTS_STREAM_SUBJECTS],
    ...limits,
  });
}

/** The last sequence number saved for a job; 0 if none (or if the file is damaged: the stream is asked then). */
async function loadCursor(jobDir: string, log: Logger): Promise<bigint> {
  for (const name of await readdir(jobDir)) {
    if (name.startsWith(`${CURSOR_FILE}${TEMP_MARK}`)) await rm(join(jobDir, name), { force: true });
  }
  const path = join(jobDir, CURSOR_FILE);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0n;
    throw err;
  }
  try {
    const parsed = JSON.parse(text) as { version?: unknown; publishedSeq?: unknown };
    if (
      parsed.version === CURSOR_VERSION &&
      typeof parsed.publishedSeq === 'string' &&
      /^[0-9]+$/.test(parsed.publishedSeq)
    )
      return BigInt(parsed.publishedSeq);
  } catch {
    // Reported below.
  }
  log.warn('ignoring a damaged NATS cursor file; the stream will be asked instead', { path });
  return 0n;
}
