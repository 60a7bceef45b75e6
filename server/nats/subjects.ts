/**
 * Names the server uses on NATS, in one place: the job events' stream, subjects, limits and message ids.
 * docs/events.md documents them for subscribers; change both together. See docs/design/events.md.
 */
import type { JobEvent } from '../../proto/gen/dppa/v1/jobs.js';

/** JetStream stream holding every job event. */
export const EVENTS_STREAM = 'DPPA_EVENTS';

/** First tokens of every event subject. */
export const SUBJECT_PREFIX = 'dppa.jobs';

/** Subjects of {@link EVENTS_STREAM}: every event of every job. */
export const EVENTS_STREAM_SUBJECTS = `${SUBJECT_PREFIX}.>`;

/** Limits the server sets on {@link EVENTS_STREAM} when it creates or updates it at start. */
export const EVENTS_STREAM_LIMITS = {
  /** Events older than this are dropped: 30 days. Subscribers that come later can still replay a job with WatchJob. */
  maxAgeMs: 30 * 24 * 3600 * 1000,
  /** Oldest events are dropped beyond this size: 1 GiB (at ~200 bytes an event, millions of events). */
  maxBytes: 1024 ** 3,
  /**
   * A publish repeating a `Nats-Msg-Id` seen within this window is dropped
   * by JetStream: 10 minutes, longer than the publisher's retry backoff, so a
   * retried publish whose first answer was lost is never stored twice.
   */
  duplicateWindowMs: 10 * 60 * 1000,
} as const;

/** Subject token of each event kind, by the `JobEvent` field that carries it. */
export const EVENT_KINDS = {
  partyJoined: 'party_joined',
  uploadProgress: 'upload_progress',
  uploadComplete: 'upload_complete',
  stateChanged: 'state_changed',
  evaluationDone: 'evaluation_done',
  factorsChosen: 'factors_chosen',
  mergeProgress: 'merge_progress',
  merged: 'merged',
  failed: 'failed',
  paused: 'paused',
  partyStopped: 'party_stopped',
  securePhaseClosed: 'secure_phase_closed',
} as const satisfies Record<keyof Omit<JobEvent, 'jobId' | 'seq' | 'time'>, string>;

/** Last token of an event subject. */
export type EventKind = (typeof EVENT_KINDS)[keyof typeof EVENT_KINDS];

/** The kind of an event: the snake_case name of its one set field; undefined if none is (an event this version does not know). */
export function eventKind(e: JobEvent): EventKind | undefined {
  for (const [field, kind] of Object.entries(EVENT_KINDS)) {
    if (e[field as keyof typeof EVENT_KINDS] !== undefined) return kind;
  }
  return undefined;
}

/** `dppa.jobs.<jobId>.<kind>`: the subject an event is published on. */
export function eventSubject(jobId: string, kind: EventKind): string {
  return `${SUBJECT_PREFIX}.${jobId}.${kind}`;
}

/** `dppa.jobs.<jobId>.>`: every event of one job. */
export function jobSubjects(jobId: string): string {
  return `${SUBJECT_PREFIX}.${jobId}.>`;
}

/** `<jobId>-<seq>`: the `Nats-Msg-Id` of an event, unique per event, so that JetStream drops a repeated publish. */
export function eventMsgId(jobId: string, seq: bigint): string {
  return `${jobId}-${seq}`;
}

/** The event number in a `Nats-Msg-Id` made by {@link eventMsgId}; undefined if it is not one. */
export function seqOfMsgId(jobId: string, msgId: string): bigint | undefined {
  const prefix = `${jobId}-`;
  if (!msgId.startsWith(prefix)) return undefined;
  const rest = msgId.slice(prefix.length);
  return /^[0-9]+$/.test(rest) ? BigInt(rest) : undefined;
}

// --- Scale-out (`--cluster`, docs/scale-out.md): what the replicas share. ---

/**
 * KV bucket shared by the replicas: every job (`job.<jobId>`, the same JSON as
 * `job.json`), each job's last event number (`seq.<jobId>`) and the progress
 * of its merge (`merge.<jobId>`), and how often each task that failed failed
 * (`failures.<jobId>.<kind>[.<which>]`). Every change is an update against the
 * revision read, retried on a conflict.
 */
export const JOBS_BUCKET = 'dppa_jobs';

/** KV key of a job. */
export function jobKey(jobId: string): string {
  return `job.${jobId}`;
}

/** KV keys of every job, for watching them. */
export const JOB_KEYS = 'job.>';

/** KV key of a job's last event number. */
export function eventSeqKey(jobId: string): string {
  return `seq.${jobId}`;
}

/** KV key of a job's merge progress: which tensors are written. */
export function mergeKey(jobId: string): string {
  return `merge.${jobId}`;
}

/**
 * Work-queue stream of the replicas' tasks (retention `workqueue`: a task is
 * removed once acknowledged), in two groups each pulled through its own
 * consumer: `merge` (plan, tensor, commit) and `search` (one DPA factor search
 * per party).
 */
export const TASKS_STREAM = 'DPPA_TASKS';

/** First tokens of every task subject. */
export const TASK_SUBJECT_PREFIX = 'dppa.tasks';

/** Subjects of {@link TASKS_STREAM}. */
export const TASKS_STREAM_SUBJECTS = `${TASK_SUBJECT_PREFIX}.>`;

/** Kinds of task: lay out a job's merge output, merge one tensor, commit the merged checkpoint; search a party's factors. */
export type TaskKind = 'plan' | 'tensor' | 'commit' | 'search';

/** The two groups of tasks, each with its durable pull consumer (filtered on `dppa.tasks.<group>.>`) shared by every replica. */
export const TASK_GROUPS = {
  merge: { consumer: 'dppa-workers', kinds: ['plan', 'tensor', 'commit'] },
  search: { consumer: 'dppa-searchers', kinds: ['search'] },
} as const satisfies Record<string, { consumer: string; kinds: readonly TaskKind[] }>;

/** A group of tasks. */
export type TaskGroup = keyof typeof TASK_GROUPS;

/** The group a kind of task belongs to. */
export function taskGroup(kind: TaskKind): TaskGroup {
  return kind === 'search' ? 'search' : 'merge';
}

/** Subjects a group's consumer pulls: `dppa.tasks.<group>.>`. */
export function taskGroupSubjects(group: TaskGroup): string {
  return `${TASK_SUBJECT_PREFIX}.${group}.>`;
}

/** `dppa.tasks.<group>.<jobId>.<kind>`: the subject of a task. */
export function taskSubject(jobId: string, kind: TaskKind): string {
  return `${TASK_SUBJECT_PREFIX}.${taskGroup(kind)}.${jobId}.${kind}`;
}

/**
 * Settings of {@link TASKS_STREAM} and its consumers, set when the server
 * creates or updates them at start (with the ack wait of the `taskAckWaitMs`
 * option).
 */
export const TASKS_LIMITS = {
  /** Tasks delivered and not yet acknowledged, over every replica. */
  maxAckPending: 256,
  /** A task published again with the same `Nats-Msg-Id` within this window is dropped: 10 minutes. */
  duplicateWindowMs: 10 * 60 * 1000,
} as const;
