/**
 * Names the server uses on NATS, in one place: the JetStream stream of job
 * events, its subjects and its limits, and the subject and message id of each
 * event. docs/events.md documents them for subscribers; change both together.
 *
 * Subject of an event: `dppa.jobs.<jobId>.<kind>`, `kind` being the snake_case
 * name of the `JobEvent` field that is set (`party_joined`, …, `failed`).
 * Job ids are base64url (`[A-Za-z0-9_-]`), so they are always one valid
 * subject token.
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
