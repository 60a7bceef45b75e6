/**
 * What the job flow runs on: where jobs and events are kept, whether the data
 * folder is shared, and how the steps of a job (factor search, merge) are
 * carried out. Two implementations: local.ts (one server, its data folder)
 * and jetstream.ts (replicas sharing NATS JetStream). docs/scale-out.md.
 */
import type { JobEvents } from '../jobs/job-events.js';
import type { FailurePolicy, StepName } from '../jobs/failure-policy.js';
import type { JobStep } from '../jobs/job-step.js';
import type { JobStore } from '../jobs/job-store.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import type { RemoteEvaluators } from '../dpa/remote-evaluators.js';
import type { Spool } from '../uploads/spool.js';

/** What the steps of a job need from the server that composes them. */
export interface StepDeps {
  spool: Spool;
  metrics: Metrics;
  log: Logger;
  broker: RemoteEvaluators;
  /** Merge threads of this server (0: the main thread). */
  mergeWorkers: number;
  /** Called once a job is MERGED, before its uploads are deleted and `merged` goes out. */
  onMerged?: (jobId: string) => void;
  /** Which failures of a task are tried again, how often and after how long (jobs/failure-policy.ts). */
  policy: FailurePolicy;
  /**
   * A task on a queue shared by replicas (where no step waits for it) failed
   * for good: applies the policy's verdict to its job (JobRunner.stepFailed).
   * @returns After how many ms the task is handed back (paused job, party sent
   *   back); undefined when it is done with (the job failed).
   */
  taskFailed: (jobId: string, step: StepName, err: unknown) => Promise<number | undefined>;
  /** A task of the job that came back after a failure succeeded: a job paused by a storage failure goes again. */
  taskDone?: (jobId: string) => void;
}

/** The steps of a job once its uploads are in, as this backend carries them out. */
export interface JobSteps {
  /** Every party's factor search (the job is in DPA). */
  search: JobStep;
  /** The merge (the job is MERGING). */
  merge: JobStep;
  /**
   * True when a step resolves once its tasks are queued (the tasks report
   * their outcome through `taskFailed` and `taskDone`); false when it
   * resolves once done and throws its failure.
   */
  readonly queued: boolean;
  /** Starts taking work (task queues); after the server listens. */
  start(): void;
  /** Stops taking work, hands back what is in progress and closes what the steps hold open. */
  close(): Promise<void>;
}

/** One backend of the job flow. */
export interface Backend {
  /** The jobs. */
  readonly store: JobStore;
  /** The jobs' event logs. */
  readonly events: JobEvents;
  /** Other servers write the same data folder: a party's spool is read again before it is relied on. */
  readonly sharedFolder: boolean;
  /** Whether a party's remote evaluator can be reached by the server running its search. */
  readonly remoteEvaluators: boolean;
  /**
   * How often the job runner looks at every unfinished job again (a move that
   * failed while the shared state was away happens once it is back); undefined: never.
   */
  readonly sweepMs: number | undefined;
  /** Whether `err` (one error of a cause chain) is one of this backend's that may pass (NATS away). */
  transient(err: unknown): boolean;
  /** The search and merge steps over this backend. */
  steps(deps: StepDeps): JobSteps;
  /**
   * Releases what the backend holds (connections, open logs); after everything
   * that uses it stopped. Events still to be published get up to `flushMs`.
   */
  close(opts?: { flushMs?: number }): Promise<void>;
}
