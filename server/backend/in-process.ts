/**
 * The in-process side of the task interface (backend/tasks.ts): tasks run
 * at once in this process over a number of lanes, a failed one again as the
 * failure policy says, merge records in memory. What an interrupted merge
 * wrote is not kept: the next one starts over.
 */
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FailurePolicy } from '../jobs/failure-policy.js';
import type { Logger } from '../log.js';
import {
  bitmap,
  countWritten,
  emptyRecord,
  isSet,
  withBit,
  type IdentifiedTask,
  type MergeRecord,
  type MergeRecords,
  type TaskHandler,
  type TaskSink,
} from './tasks.js';

/**
 * Runs submitted tasks here, at most `lanes` at once; a failed task runs again
 * while the policy says so, and its final failure aborts the others.
 */
export class InProcessTasks implements TaskSink {
  constructor(
    /** Tasks of one submission run at once (Infinity: all). */
    private readonly lanes: number,
    /** The handler of every task; set before any task is submitted. */
    private readonly handler: () => TaskHandler,
    private readonly policy: FailurePolicy,
    private readonly log: Logger,
  ) {}

  async submit(tasks: readonly IdentifiedTask[], signal: AbortSignal): Promise<void> {
    signal.throwIfAborted();
    // One failure aborts the tasks still running, with that failure as the reason.
    const controller = new AbortController();
    const forward = (): void => controller.abort(signal.reason);
    signal.addEventListener('abort', forward, { once: true });
    try {
      await inWindow(tasks, Math.min(this.lanes, tasks.length), async (t) => {
        try {
          await this.attempts(t, controller.signal);
        } catch (err) {
          if (!controller.signal.aborted) controller.abort(err);
          throw err;
        }
      });
    } finally {
      signal.removeEventListener('abort', forward);
    }
  }

  /**
   * Runs a task until it succeeds or its failure is final (jobs/failure-policy.ts).
   * @throws The final failure (AttemptsExhaustedError once the runs are spent); the signal's reason when aborted.
   */
  private async attempts(t: IdentifiedTask, signal: AbortSignal): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.handler()(t.task, signal);
        return;
      } catch (err) {
        if (signal.aborted) throw err;
        if (!this.policy.retries(err, attempt)) throw this.policy.final(err, attempt);
        const delayMs = this.policy.retryDelayMs(attempt);
        this.log.warn('task failed; runs again', {
          kind: t.task.kind,
          jobId: t.task.jobId,
          attempt,
          of: this.policy.taskAttempts,
          delayMs,
          err,
        });
        await sleep(delayMs, undefined, { signal }).catch(() => {
          throw signal.reason;
        });
      }
    }
  }
}

/** Merge records of this process; a record ends with the merge step that created it. */
export class MemoryMergeRecords implements MergeRecords {
  private readonly records = new Map<string, MergeRecord>();

  get(jobId: string): Promise<MergeRecord | undefined> {
    return Promise.resolve(this.records.get(jobId));
  }

  create(jobId: string, tensorsTotal: number): Promise<MergeRecord> {
    let record = this.records.get(jobId);
    if (record === undefined) {
      // A name the data folder's recovery deletes (merged.tmp-*) if the server dies mid-merge.
      record = emptyRecord(tensorsTotal, `merged.tmp-${randomBytes(6).toString('hex')}`);
      this.records.set(jobId, record);
    }
    return Promise.resolve(record);
  }

  markWritten(jobId: string, index: number): Promise<number> {
    const record = this.records.get(jobId);
    if (record === undefined) return Promise.reject(new Error(`job ${jobId} has no merge record`));
    if (isSet(bitmap(record), index)) return Promise.resolve(countWritten(record));
    const updated = withBit(record, index);
    this.records.set(jobId, updated);
    return Promise.resolve(countWritten(updated));
  }

  endRun(jobId: string): Promise<MergeRecord | undefined> {
    const record = this.records.get(jobId);
    this.records.delete(jobId);
    return Promise.resolve(record);
  }
}

/** Runs `fn` over `items` with at most `width` calls pending; the first failure stops new calls and is thrown once all pending ones settled. */
async function inWindow<T>(items: readonly T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { err: unknown } | undefined;
  const lane = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      try {
        await fn(items[next++]!);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, width) }, lane));
  if (failure !== undefined) throw failure.err;
}
