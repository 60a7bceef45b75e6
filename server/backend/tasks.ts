/**
 * The work of a job as tasks (plan, tensor, commit; search), and what a
 * backend offers to carry them out: a task queue and the merge records.
 */
import type { TaskKind } from '../nats/subjects.js';

/** A task (on JetStream, its JSON payload). */
export interface Task {
  kind: TaskKind;
  jobId: string;
  /** Tensor tasks: the tensor's name and its index among the base's tensors. */
  tensor?: { name: string; index: number };
  /** Search tasks: the party whose factors are searched. */
  party?: string;
}

/** Carries out one task; resolves once its result is stored. */
export type TaskHandler = (task: Task, signal: AbortSignal) => Promise<void>;

/**
 * Thrown by a handler whose task cannot run yet (e.g. this replica's copy of
 * the job lags the bucket): the task is handed back and comes back after
 * `delayMs`, logged as information rather than as a failure.
 */
export class TaskNotReadyError extends Error {
  override name = 'TaskNotReadyError';

  constructor(
    message: string,
    readonly delayMs = 2000,
  ) {
    super(message);
  }
}

/** A task and the id that makes it unique (a task submitted again with the same id while the first is queued is dropped). */
export interface IdentifiedTask {
  task: Task;
  id: string;
}

/** Where a job step hands its tasks. */
export interface TaskSink {
  /**
   * Hands tasks over. On a queue shared by replicas: resolves once they are
   * queued (their outcome is the tasks' business). In process: runs them, at
   * most one per lane at once, and resolves once all are done; the first
   * failure stops the rest and is thrown.
   */
  submit(tasks: readonly IdentifiedTask[], signal: AbortSignal): Promise<void>;
  /** On a queue shared by replicas: tasks of this kind and job still queued. */
  queued?(jobId: string, kind: TaskKind): Promise<number>;
}

/** Which tensors of a job's merge are written, and where the output is laid out. */
export interface MergeRecord {
  tensorsTotal: number;
  /** Bitmap of the tensors written (bit i: tensor i of the base), base64. */
  written: string;
  /** RFC 3339: when the plan ran first, for the merge's duration. */
  startedAt: string;
  /** Folder of the output while it is written, in the job's folder. @default 'merged.cluster-tmp' */
  workDir?: string;
}

/** The merge records of every job. */
export interface MergeRecords {
  /** The job's record, if its plan ran. */
  get(jobId: string): Promise<MergeRecord | undefined>;
  /** Creates the job's record (nothing written yet), or returns the one created meanwhile. */
  create(jobId: string, tensorsTotal: number): Promise<MergeRecord>;
  /** Sets a tensor's bit. @returns How many tensors are written now. */
  markWritten(jobId: string, index: number): Promise<number>;
  /**
   * The merge step that submitted the plan returned (done, failed or aborted).
   * @returns The record if it is gone with it (in process: the next merge
   *   starts over, its output folder is deleted); undefined when queued tasks
   *   carry the merge on.
   */
  endRun(jobId: string): Promise<MergeRecord | undefined>;
}

/** Default folder of a merge output while it is written. */
export const DEFAULT_WORK_DIR = 'merged.cluster-tmp';

/** The record's bitmap. */
export function bitmap(record: MergeRecord): Uint8Array {
  return new Uint8Array(Buffer.from(record.written, 'base64'));
}

/** Whether bit `index` is set. */
export function isSet(bits: Uint8Array, index: number): boolean {
  return ((bits[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
}

/** Number of tensors written. */
export function countWritten(record: MergeRecord): number {
  let n = 0;
  for (const byte of bitmap(record)) for (let b = byte; b !== 0; b &= b - 1) n++;
  return n;
}

/** A record with nothing written. */
export function emptyRecord(tensorsTotal: number, workDir?: string): MergeRecord {
  const record: MergeRecord = {
    tensorsTotal,
    written: Buffer.alloc(Math.ceil(tensorsTotal / 8)).toString('base64'),
    startedAt: new Date().toISOString(),
  };
  if (workDir !== undefined) record.workDir = workDir;
  return record;
}

/** Sets bit `index` of the record's bitmap (a copy). */
export function withBit(record: MergeRecord, index: number): MergeRecord {
  const written = bitmap(record);
  written[index >> 3]! |= 1 << (index & 7);
  return { ...record, written: Buffer.from(written).toString('base64') };
}
