/**
 * Job events: the {@link JobEvents} interface and its embedded implementation, {@link FileJobEvents}, a log per job
 * in `jobs/<id>/events.jsonl` replayed to watchers. See docs/design/events.md.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { JobEvent } from '../../proto/gen/dppa/v1/jobs.js';
import type { Logger } from '../log.js';

/** Name of a job's event log in its folder. */
export const EVENTS_FILE = 'events.jsonl';

/** An event before the log gives it its job, number and time. */
export type EventBody = Omit<Partial<JobEvent>, 'jobId' | 'seq' | 'time'>;

interface JobLog {
  events: JobEvent[];
  file: FileHandle;
  /** Bytes of whole lines in the file: where the next event goes. */
  bytes: number;
  /** The last append; the next one is written after it. */
  tail: Promise<void>;
  listeners: Set<(e: JobEvent) => void>;
}

/** True for the events after which nothing more happens to a job. */
export function isFinalEvent(e: JobEvent): boolean {
  return e.merged !== undefined || e.failed !== undefined;
}

/** The events of every job: numbering and recording them, replaying and following them. */
export interface JobEvents {
  /** Opens (or creates) the log of a job whose folder is `dir`. */
  load(jobId: string, dir: string): Promise<void>;
  /** Closes the log of a job whose creation failed (its folder is deleted next); nothing if none is loaded. */
  unload(jobId: string): Promise<void>;
  /**
   * Numbers (`seq` from 1, one more than the job's last), records and
   * announces an event; resolves once it is recorded.
   */
  append(jobId: string, body: EventBody): Promise<JobEvent>;
  /**
   * The job's events after `afterSeq`: the recorded ones, then live ones as
   * they happen. Ends after a `merged` or `failed` event (or at once if one is
   * already recorded at or before `afterSeq`), or when `signal` aborts, which
   * throws its reason.
   */
  watch(jobId: string, afterSeq: bigint, signal: AbortSignal): AsyncGenerator<JobEvent, void, undefined>;
  /**
   * Logs that can miss a final event (the cluster's stream: the job's state
   * is written before its event is published): whether the job's `merged`
   * or `failed` event is in the log. Absent when the log cannot miss it.
   */
  hasFinalEvent?(jobId: string): Promise<boolean>;
  /** Number of live subscriptions over all jobs (tests check that none leak). */
  readonly watcherCount: number;
  /** Waits for pending writes and releases what the logs hold open. */
  close(): Promise<void>;
}

/** Event logs of every job of a data folder (the embedded default). */
export class FileJobEvents implements JobEvents {
  private readonly logs = new Map<string, JobLog>();
  /** Called with every event once it is in the log file (see {@link onAppended}). */
  private readonly appended = new Set<(e: JobEvent) => void>();

  constructor(private readonly log: Logger) {}

  /** Opens (or creates) the log of a job in `dir` and reads back its events. */
  async load(jobId: string, dir: string): Promise<void> {
    const path = join(dir, EVENTS_FILE);
    const events: JobEvent[] = [];
    let text = '';
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    const lines = text.split('\n');
    for (const [i, line] of lines.entries()) {
      if (line === '') continue;
      try {
        events.push(JobEvent.fromJSON(JSON.parse(line)));
      } catch (err) {
        // Only the last line can be torn by a crash; anything else is damage worth a word.
        if (i < lines.length - 1 && lines.slice(i + 1).some((l) => l !== ''))
          this.log.warn('skipping a damaged event line', { path, line: i + 1, err });
      }
    }
    const bytes = Buffer.byteLength(text.slice(0, text.lastIndexOf('\n') + 1));
    const file = await open(path, 'a');
    try {
      // A last line cut short (a crash) is dropped: the next event starts a line of its own.
      if (bytes < Buffer.byteLength(text)) await file.truncate(bytes);
    } catch (err) {
      await file.close();
      throw err;
    }
    this.logs.set(jobId, { events, file, bytes, tail: Promise.resolve(), listeners: new Set() });
  }

  /** Closes the log of a job whose creation failed; nothing if none is loaded. */
  async unload(jobId: string): Promise<void> {
    const l = this.logs.get(jobId);
    if (l === undefined) return;
    this.logs.delete(jobId);
    await l.tail;
    await l.file.close();
  }

  private job(jobId: string): JobLog {
    const l = this.logs.get(jobId);
    if (l === undefined) throw new Error(`no event log loaded for job ${jobId}`);
    return l;
  }

  /** Sequence number of the job's last event; 0 if none. */
  lastSeq(jobId: string): bigint {
    return this.job(jobId).events.at(-1)?.seq ?? 0n;
  }

  /**
   * Numbers, records and publishes an event. Resolves once it is written to
   * the log file (watchers see it at once).
   */
  async append(jobId: string, body: EventBody): Promise<JobEvent> {
    const l = this.job(jobId);
    const event = JobEvent.fromPartial({
      ...body,
      jobId,
      seq: this.lastSeq(jobId) + 1n,
      time: new Date().toISOString(),
    });
    l.events.push(event);
    for (const listener of l.listeners) listener(event);
    const line = `${JSON.stringify(JobEvent.toJSON(event))}\n`;
    const final = isFinalEvent(event);
    l.tail = l.tail.then(async () => {
      try {
        await l.file.appendFile(line);
      } catch (err) {
        // Part of the line may be written (a full disk): take it back, so that the next event starts a line of its own.
        await l.file.truncate(l.bytes).catch(() => undefined);
        throw err;
      }
      l.bytes += Buffer.byteLength(line);
      if (final) await l.file.sync();
    });
    // A failed append is logged, not thrown: the event was delivered and the job's state lives in job.json.
    l.tail = l.tail.catch((err: unknown) => this.log.error('cannot append to the event log', { jobId, err }));
    await l.tail;
    for (const listener of this.appended) listener(event);
    return event;
  }

  /**
   * Calls `listener` with every event of every job once it is written to the
   * job's log file, in order within a job (the NATS outbox only publishes what
   * a restart would read back). It must not throw or block.
   * @returns A function that removes the listener.
   */
  onAppended(listener: (e: JobEvent) => void): () => void {
    this.appended.add(listener);
    return () => this.appended.delete(listener);
  }

  /** Up to `max` recorded events of a job with a sequence number above `afterSeq`, in order. */
  recorded(jobId: string, afterSeq: bigint, max: number): JobEvent[] {
    const events = this.job(jobId).events;
    // Sequence numbers increase along the array (a damaged line may leave a gap): binary search the first one after `afterSeq`.
    let lo = 0;
    let hi = events.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (events[mid]!.seq <= afterSeq) lo = mid + 1;
      else hi = mid;
    }
    return events.slice(lo, lo + max);
  }

  /**
   * The job's events after `afterSeq`: the recorded ones, then live ones as
   * they happen. Ends after a `merged` or `failed` event (or at once if one is
   * already recorded at or before `afterSeq`), or when `signal` aborts, which
   * throws its reason. The subscription is removed however the iteration ends.
   */
  async *watch(jobId: string, afterSeq: bigint, signal: AbortSignal): AsyncGenerator<JobEvent, void, undefined> {
    const l = this.job(jobId);
    const queue: JobEvent[] = [];
    let wake: (() => void) | undefined;
    const listener = (e: JobEvent): void => {
      queue.push(e);
      wake?.();
    };
    const onAbort = (): void => wake?.();
    // Subscribe before replaying, so that nothing published meanwhile is missed.
    l.listeners.add(listener);
    signal.addEventListener('abort', onAbort);
    try {
      let last = afterSeq;
      for (const e of l.events) {
        if (e.seq <= afterSeq) {
          if (isFinalEvent(e)) return;
          continue;
        }
        signal.throwIfAborted();
        yield e;
        last = e.seq;
        if (isFinalEvent(e)) return;
      }
      for (;;) {
        signal.throwIfAborted();
        const e = queue.shift();
        if (e === undefined) {
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
          continue;
        }
        if (e.seq <= last) continue;
        yield e;
        last = e.seq;
        if (isFinalEvent(e)) return;
      }
    } finally {
      l.listeners.delete(listener);
      signal.removeEventListener('abort', onAbort);
    }
  }

  /** Number of live subscriptions over all jobs (tests check that none leak). */
  get watcherCount(): number {
    let n = 0;
    for (const l of this.logs.values()) n += l.listeners.size;
    return n;
  }

  /** Waits for pending writes and closes every log file. */
  async close(): Promise<void> {
    const logs = [...this.logs.values()];
    this.logs.clear();
    await Promise.all(
      logs.map(async (l) => {
        await l.tail;
        await l.file.close();
      }),
    );
  }
}
