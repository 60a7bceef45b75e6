/**
 * What a secure job stores with its record (job.json or the cluster's KV entry): its parameters, the phase it
 * collects, and the SecureAggregator's state after the last accepted message. docs/privacy.md, "Wiring".
 */
import { deserialize, serialize } from 'node:v8';
import { SecurePhase, securePhaseFromJSON, securePhaseToJSON } from '../../proto/gen/dppa/v1/jobs.js';
import { SecureAggregator, type AggregatorState } from '../../proto/secure/index.js';

/** Seconds a phase waits for parties that have not answered, when the job gives none. */
export const DEFAULT_SECURE_PHASE_SECONDS = 600;

/** Largest `secure_phase_seconds`: 7 days (a timer cannot wait beyond 2^31 - 1 ms). */
export const MAX_SECURE_PHASE_SECONDS = 7 * 24 * 3600;

/** Most parties of a secure job: the aggregator state, rewritten with the job record per message, grows as n². */
export const MAX_SECURE_PARTIES = 64;

/** The secure part of a stored job (plain JSON). */
export interface SecureRecord {
  threshold: number;
  clipBound: number;
  phaseSeconds: number;
  /** `SECURE_PHASE_SUPPORT`, …: the phase being collected. */
  phase: string;
  /** RFC 3339 time the phase opened. */
  phaseSince: string;
  /** |U| once SUPPORT closed, else 0. */
  unionSize: number;
  /** Parties whose support is in U (SUPPORT closed), by name. */
  supporters: string[];
  /** Values each party of U3 clipped to the bound, as it reported them, by name (absent: 0). */
  clipped?: Record<string, number>;
  /** v8-serialised AggregatorState, base64. */
  aggregator: string;
  /** A replica's claim to close `phase` (replicas sharing the store): others leave it alone until `until`. */
  closing?: { phase: string; id: string; until: string };
  /** Per party, the replica whose masked upload stream writes its file (replicas sharing the store), until `until`. */
  maskedClaims?: Record<string, { id: string; until: string }>;
}

/** The record's phase as the enum. */
export function phaseOf(r: SecureRecord): SecurePhase {
  return securePhaseFromJSON(r.phase);
}

/** Sets the phase (and when it opened). */
export function setPhase(r: SecureRecord, phase: SecurePhase): void {
  r.phase = securePhaseToJSON(phase);
  r.phaseSince = new Date().toISOString();
}

/** The aggregator as stored. */
export function loadAggregator(r: SecureRecord): SecureAggregator {
  return SecureAggregator.restore(deserialize(Buffer.from(r.aggregator, 'base64')) as AggregatorState);
}

/** Stores the aggregator's state in the record. */
export function saveAggregator(r: SecureRecord, agg: SecureAggregator): void {
  r.aggregator = serialize(agg.state).toString('base64');
}

/** The record of a new secure job (collecting supports). */
export function newSecureRecord(
  jobId: string,
  parties: number,
  threshold: number,
  clipBound: number,
  phaseSeconds: number,
): SecureRecord {
  const r: SecureRecord = {
    threshold,
    clipBound,
    phaseSeconds,
    phase: '',
    phaseSince: '',
    unionSize: 0,
    supporters: [],
    aggregator: '',
  };
  setPhase(r, SecurePhase.SECURE_PHASE_SUPPORT);
  saveAggregator(r, SecureAggregator.create({ jobId, parties, threshold }));
  return r;
}

/** A party's protocol number: its place in the job's party list, from 1. */
export function partyIndex(parties: readonly { name: string }[], name: string): number {
  return parties.findIndex((p) => p.name === name) + 1;
}
