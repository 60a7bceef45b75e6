/**
 * A step of a job once its uploads are in (the factor search, the merge), as
 * the job runner asks for it; the backend decides where it runs (backend/).
 */

/** One step of every job. */
export interface JobStep {
  /**
   * Carries the step out for a job in the step's state: here, resolving once
   * it is done, or on a task queue, resolving once the tasks are queued (the
   * last task moves the job on). Idempotent.
   * @throws The signal's reason when aborted; any failure, which the runner
   *   settles with the failure policy (failure-policy.ts: pause, party sent
   *   back, wait for the sweep, or fail).
   */
  run(jobId: string, signal: AbortSignal): Promise<void>;
  /** Disk space the step still needs to write for the job (a job paused by a full disk waits for it); the merge has it. */
  spaceNeeded?(jobId: string): Promise<number>;
}
