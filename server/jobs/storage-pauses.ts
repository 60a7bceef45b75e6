/**
 * Jobs paused by a storage failure (a full disk, an I/O error) instead of failed, and when each is tried again.
 * Kept in memory. See docs/design/jobs.md.
 */
import type { Pause } from '../../proto/gen/dppa/v1/jobs.js';
import { DiskFullError, type StorageUnavailableError } from '../errors.js';

/** Default first wait before a paused job is tried again; it doubles after each failure. */
export const DEFAULT_STORAGE_RETRY_MS = 5000;

/** Longest wait between two attempts. */
const MAX_STORAGE_RETRY_MS = 5 * 60 * 1000;

/** What {@link StoragePauses} calls. */
export interface StoragePausesOptions {
  /** First wait; doubles after each failure up to 5 minutes (or this, if longer). */
  initialMs: number;
  /** Starts the next attempt of a job. */
  retry(jobId: string): void;
  /** Whether the disk now has room for the job's next step (asked before retrying after a full disk). */
  hasRoom(jobId: string): Promise<boolean>;
}

interface Entry {
  pause: Pause;
  diskFull: boolean;
  /** What the job had done when it was paused first (JobRunner's progress marker). */
  progress: string;
  timer: NodeJS.Timeout | undefined;
}

/** The paused jobs of one runner. */
export class StoragePauses {
  private readonly entries = new Map<string, Entry>();
  private stopped = false;

  constructor(private readonly opts: StoragePausesOptions) {}

  /** The job's pause, if it is paused. */
  get(jobId: string): Pause | undefined {
    return this.entries.get(jobId)?.pause;
  }

  /** Number of paused jobs. */
  get size(): number {
    return this.entries.size;
  }

  /** True while the job waits for its next automatic attempt (a pause with no attempt running). */
  waiting(jobId: string): boolean {
    return this.entries.get(jobId)?.timer !== undefined;
  }

  /**
   * Records a failed attempt and schedules the next one.
   * @returns The job's pause, as shown and announced.
   */
  add(jobId: string, err: DiskFullError | StorageUnavailableError, progress = ''): Pause {
    const prev = this.entries.get(jobId);
    if (prev?.timer !== undefined) clearTimeout(prev.timer);
    const entry: Entry = {
      pause: {
        reason: err.message,
        attempts: (prev?.pause.attempts ?? 0) + 1,
        since: prev?.pause.since ?? new Date().toISOString(),
        nextAttemptAt: '',
      },
      diskFull: err instanceof DiskFullError,
      progress: prev?.progress ?? progress,
      timer: undefined,
    };
    this.entries.set(jobId, entry);
    this.schedule(jobId, entry);
    return { ...entry.pause };
  }

  /** Starts the next attempt of a paused job now. @returns False if the job is not paused. */
  retryNow(jobId: string): boolean {
    const entry = this.entries.get(jobId);
    if (entry === undefined || this.stopped) return false;
    clearTimeout(entry.timer);
    entry.timer = undefined;
    entry.pause.nextAttemptAt = '';
    this.opts.retry(jobId);
    return true;
  }

  /** Whether the job is paused and went on since its pause began (`progress` differs from the one recorded then). */
  outgrown(jobId: string, progress: string): boolean {
    const entry = this.entries.get(jobId);
    return entry !== undefined && entry.progress !== progress;
  }

  /** The job went on (or ended): forgets its pause. */
  clear(jobId: string): void {
    clearTimeout(this.entries.get(jobId)?.timer);
    this.entries.delete(jobId);
  }

  /** Cancels every scheduled attempt. */
  stop(): void {
    this.stopped = true;
    for (const e of this.entries.values()) clearTimeout(e.timer);
  }

  private schedule(jobId: string, entry: Entry): void {
    if (this.stopped) return;
    const { initialMs } = this.opts;
    const delay = Math.min(Math.max(initialMs, MAX_STORAGE_RETRY_MS), initialMs * 2 ** (entry.pause.attempts - 1));
    entry.pause.nextAttemptAt = new Date(Date.now() + delay).toISOString();
    entry.timer = setTimeout(() => void this.due(jobId, entry), delay);
  }

  private async due(jobId: string, entry: Entry): Promise<void> {
    // A merge into a disk still too full would fail again after all its work: wait on, without counting an attempt.
    const room = !entry.diskFull || (await this.opts.hasRoom(jobId).catch(() => true));
    // Meanwhile the job may have been resumed by hand, have gone on or ended.
    if (this.entries.get(jobId) !== entry || entry.pause.nextAttemptAt === '') return;
    if (room) this.retryNow(jobId);
    else this.schedule(jobId, entry);
  }
}
