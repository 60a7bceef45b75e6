/**
 * How jobs and job events are printed: as JSON (stable field names, states
 * and enums as lower-case words, 64-bit counts as numbers) and as text.
 */
import { DEFAULT_PRUNE_METHOD, pruneMethodFromWire, searchDefaults } from '../../proto/algorithm/index.js';
import {
  evaluatorKindToJSON,
  searchMethodToJSON,
  tunerToJSON,
  type DpaConfig,
  type Evaluation,
  type Job,
  type JobEvent,
  type MergeOptions,
  type Pause,
} from '../../proto/gen/dppa/v1/jobs.js';
import { Privacy, SecurePhase } from '../../proto/gen/dppa/v1/jobs.js';
import { jobStateName } from '../sdk/jobs.js';
import { securePhaseName } from '../sdk/secure-push.js';
import { formatBytes } from './progress.js';

/** The search's defaults, shown beside an unset method or tuner. */
const SEARCH_DEFAULTS = searchDefaults({ partitions: 1 });

/** `SEARCH_METHOD_WHOLE` → `whole`; the zero value → `default`, or `default (whole)` given the default's name. */
function word(json: string, prefix: string, dflt?: string): string {
  const w = json.startsWith(prefix) ? json.slice(prefix.length).toLowerCase() : json.toLowerCase();
  if (w !== 'unspecified') return w;
  return dflt === undefined ? 'default' : `default (${dflt})`;
}

/** DpaConfig as JSON: `{ mode: 'off' | 'fixed' | 'search' | 'unset', … }`. */
export function dpaJson(dpa: DpaConfig | undefined): Record<string, unknown> {
  if (dpa === undefined) return { mode: 'unset' };
  const common = { scaleOutsideByMax: dpa.scaleOutsideByMax };
  if (dpa.off !== undefined) return { mode: 'off', ...common };
  if (dpa.fixed !== undefined) {
    const perParty = Object.fromEntries(Object.entries(dpa.fixed.perParty).map(([p, l]) => [p, l.factors]));
    return { mode: 'fixed', factors: dpa.fixed.factors, perParty, ...common };
  }
  if (dpa.search !== undefined) {
    const s = dpa.search;
    return {
      mode: 'search',
      method: word(searchMethodToJSON(s.method), 'SEARCH_METHOD_', SEARCH_DEFAULTS.method),
      tuner: word(tunerToJSON(s.tuner), 'TUNER_', SEARCH_DEFAULTS.tuner),
      start: s.start,
      step: s.step,
      upper: s.upper,
      lower: s.lower,
      budget: s.budget,
      downward: s.downward,
      evaluator: word(evaluatorKindToJSON(s.evaluator), 'EVALUATOR_KIND_'),
      partyTimeoutSeconds: s.partyTimeoutSeconds,
      ...common,
    };
  }
  return { mode: 'unset', ...common };
}

function mergeJson(m: MergeOptions | undefined): Record<string, unknown> {
  return {
    weights: { ...m?.weights },
    signElection: m?.signElection ?? false,
    partiesMayDownload: m?.partiesMayDownload ?? false,
  };
}

function evaluationJson(e: Evaluation): Record<string, unknown> {
  return {
    party: e.party,
    seq: e.seq,
    denseReference: e.denseReference,
    factors: e.factors,
    scores: { ...e.scores },
    domainRatio: e.domainRatio,
  };
}

/** A job as JSON, as `dppa job status --json` prints it. */
export function jobJson(job: Job): Record<string, unknown> {
  return {
    jobId: job.id,
    label: job.label,
    state: jobStateName(job.state),
    basePath: job.basePath,
    baseFingerprint: job.baseFingerprint,
    rate: job.rate,
    method: job.method,
    dpa: dpaJson(job.dpa),
    merge: mergeJson(job.merge),
    maxAbsValue: job.maxAbsValue,
    privacy: job.privacy === Privacy.PRIVACY_SECURE ? 'secure' : 'plain',
    ...(job.privacy === Privacy.PRIVACY_SECURE
      ? {
          threshold: job.threshold,
          clipBound: job.clipBound,
          securePhase: securePhaseName(job.securePhase),
          securePhaseSeconds: job.securePhaseSeconds,
        }
      : {}),
    parties: job.parties.map((p) => ({
      name: p.name,
      tensorsReceived: p.tensorsReceived,
      tensorsExpected: p.tensorsExpected,
      bytesReceived: Number(p.bytesReceived),
      uploadComplete: p.uploadComplete,
      factors: p.factors,
      factorsFinal: p.factorsFinal,
      stoppedReason: p.stoppedReason === '' ? null : p.stoppedReason,
    })),
    evaluations: job.evaluations.map(evaluationJson),
    failureReason: job.failureReason === '' ? null : job.failureReason,
    pause: job.pause === undefined ? null : pauseJson(job.pause),
    createdAt: job.createdAt,
    updatedAt: job.updatedAt,
  };
}

function pauseJson(p: Pause): Record<string, unknown> {
  return {
    reason: p.reason,
    attempts: p.attempts,
    since: p.since,
    nextAttemptAt: p.nextAttemptAt === '' ? null : p.nextAttemptAt,
  };
}

/** A pause as text: the reason, the failed attempts and the next one. */
export function pauseText(p: Pause): string {
  const next = p.nextAttemptAt === '' ? 'trying again now' : `next attempt at ${p.nextAttemptAt} (or dppa job resume)`;
  return `${p.reason}; ${p.attempts} failed attempt${p.attempts === 1 ? '' : 's'} since ${p.since}; ${next}`;
}

function factors(f: readonly number[]): string {
  return f.length === 0 ? '-' : f.join(', ');
}

function dpaText(dpa: DpaConfig | undefined): string {
  const j = dpaJson(dpa);
  if (dpa?.fixed !== undefined) {
    const per = Object.entries(dpa.fixed.perParty).map(([p, l]) => `${p}: ${factors(l.factors)}`);
    return ['fixed', dpa.fixed.factors.length > 0 ? factors(dpa.fixed.factors) : '', ...per].filter(Boolean).join('; ');
  }
  if (dpa?.search !== undefined)
    return `search (${String(j.method)}, ${String(j.tuner)}, evaluator ${String(j.evaluator)})`;
  return String(j.mode);
}

/** The job's method: the `prune_method` enum, else the older text, else DP; a value this client does not know as its number. */
function jobMethod(job: Job): string {
  try {
    return pruneMethodFromWire(job.pruneMethod, job.method) ?? DEFAULT_PRUNE_METHOD;
  } catch (err) {
    if (err instanceof RangeError)
      return `unknown (prune_method ${job.pruneMethod}, method ${JSON.stringify(job.method)})`;
    throw err;
  }
}

/** A job as text, as `dppa job status` prints it. */
export function jobText(job: Job): string {
  const lines = [
    `job ${job.id}  ${jobStateName(job.state)}${job.label === '' ? '' : `  "${job.label}"`}`,
    `  base        ${job.basePath}${job.baseFingerprint === '' ? '' : `  (fingerprint ${job.baseFingerprint.slice(0, 16)}…)`}`,
    `  pruning     ${jobMethod(job)} at rate ${job.rate}${job.maxAbsValue === 0 ? '' : `; values within ±${job.maxAbsValue}`}`,
    `  dpa         ${job.privacy === Privacy.PRIVACY_SECURE ? "each party's own (searched and applied before its masked upload)" : dpaText(job.dpa)}`,
  ];
  if (job.privacy === Privacy.PRIVACY_SECURE)
    lines.push(
      `  privacy     secure, threshold ${job.threshold}, clip bound ${job.clipBound}; phase ${securePhaseName(job.securePhase)}` +
        (job.securePhaseSeconds === 0 ? '' : ` (each phase waits ${job.securePhaseSeconds} s)`),
    );
  const weights = Object.entries(job.merge?.weights ?? {}).map(([p, w]) => `${p}=${w}`);
  lines.push(
    `  merge       weights ${weights.length === 0 ? 'all 1' : weights.join(', ')}; sign election ${job.merge?.signElection === true ? 'on' : 'off'}; ` +
      `parties may download: ${job.merge?.partiesMayDownload === true ? 'yes' : 'no'}`,
  );
  if (job.createdAt !== '')
    lines.push(`  created     ${job.createdAt}${job.updatedAt === '' ? '' : `, updated ${job.updatedAt}`}`);
  lines.push('  parties');
  const width = Math.max(0, ...job.parties.map((p) => p.name.length));
  for (const p of job.parties) {
    const upload = p.uploadComplete ? 'complete' : p.tensorsExpected === 0 ? 'waiting' : 'uploading';
    const f = p.factors.length === 0 ? '' : `  factors ${factors(p.factors)}${p.factorsFinal ? ' (final)' : ''}`;
    lines.push(
      `    ${p.name.padEnd(width)}  ${p.tensorsReceived}/${p.tensorsExpected} tensors  ${formatBytes(Number(p.bytesReceived))}  ${upload}${f}`,
    );
    if (p.stoppedReason !== '') lines.push(`    ${' '.repeat(width)}  stopped: ${p.stoppedReason}`);
  }
  if (job.evaluations.length > 0) {
    lines.push(`  evaluations ${job.evaluations.length}`);
    lines.push(...evaluationTable(job.evaluations).map((l) => `    ${l}`));
  }
  if (job.pause !== undefined) lines.push(`  paused      ${pauseText(job.pause)}`);
  if (job.failureReason !== '') lines.push(`  failure     ${job.failureReason}`);
  return lines.join('\n');
}

/** The evaluations as an aligned table: party, seq, candidate, Domain-Ratio, per-task scores. */
function evaluationTable(evaluations: readonly Evaluation[]): string[] {
  const rows = [
    ['party', '#', 'candidate', 'domain ratio', 'scores'],
    ...evaluations.map((e) => [
      e.party,
      String(e.seq),
      e.denseReference ? 'dense reference' : factors(e.factors),
      `${(100 * e.domainRatio).toFixed(2)}%`,
      Object.entries(e.scores)
        .map(([t, s]) => `${t}=${Number(s.toPrecision(6))}`)
        .join(' '),
    ]),
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  // Numbers right-aligned, words left-aligned; the last column is not padded.
  return rows.map((r) =>
    r
      .map((cell, c) =>
        c === r.length - 1 ? cell : c === 1 || c === 3 ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!),
      )
      .join('  '),
  );
}

function evaluationText(e: Evaluation): string {
  const what = e.denseReference ? 'dense reference' : `factors ${factors(e.factors)}`;
  return `${e.party} #${e.seq}: ${what}, domain ratio ${(100 * e.domainRatio).toFixed(2)}%`;
}

/** The kind of an event: the name of the field that is set. */
export function eventType(ev: JobEvent): string {
  for (const k of [
    'partyJoined',
    'uploadProgress',
    'uploadComplete',
    'stateChanged',
    'evaluationDone',
    'factorsChosen',
    'mergeProgress',
    'merged',
    'failed',
    'paused',
    'partyStopped',
    'securePhaseClosed',
  ] as const) {
    if (ev[k] !== undefined) return k;
  }
  return 'unknown';
}

/** An event as one JSON object: `{ jobId, seq, time, type, …fields of the event }`. */
export function eventJson(ev: JobEvent): Record<string, unknown> {
  const head = { jobId: ev.jobId, seq: Number(ev.seq), time: ev.time, type: eventType(ev) };
  if (ev.partyJoined !== undefined) return { ...head, party: ev.partyJoined.party };
  if (ev.uploadProgress !== undefined) {
    const u = ev.uploadProgress;
    return {
      ...head,
      party: u.party,
      tensorsReceived: u.tensorsReceived,
      tensorsExpected: u.tensorsExpected,
      bytesReceived: Number(u.bytesReceived),
    };
  }
  if (ev.uploadComplete !== undefined) return { ...head, party: ev.uploadComplete.party };
  if (ev.stateChanged !== undefined)
    return { ...head, from: jobStateName(ev.stateChanged.from), to: jobStateName(ev.stateChanged.to) };
  if (ev.evaluationDone !== undefined)
    return {
      ...head,
      evaluation: ev.evaluationDone.evaluation === undefined ? null : evaluationJson(ev.evaluationDone.evaluation),
    };
  if (ev.factorsChosen !== undefined)
    return {
      ...head,
      party: ev.factorsChosen.party,
      factors: ev.factorsChosen.factors,
      domainRatio: ev.factorsChosen.domainRatio,
    };
  if (ev.mergeProgress !== undefined)
    return { ...head, tensorsDone: ev.mergeProgress.tensorsDone, tensorsTotal: ev.mergeProgress.tensorsTotal };
  if (ev.merged !== undefined) return { ...head, files: ev.merged.files, seconds: ev.merged.seconds };
  if (ev.failed !== undefined) return { ...head, reason: ev.failed.reason };
  if (ev.paused !== undefined) return { ...head, ...pauseJson(ev.paused) };
  if (ev.partyStopped !== undefined)
    return {
      ...head,
      party: ev.partyStopped.party,
      reason: ev.partyStopped.reason,
      discardedTensors: ev.partyStopped.discardedTensors,
    };
  if (ev.securePhaseClosed !== undefined) {
    const c = ev.securePhaseClosed;
    return {
      ...head,
      phase: securePhaseName(c.phase),
      next: securePhaseName(c.next),
      parties: c.parties,
      missing: c.missing,
      unionSize: Number(c.unionSize),
      seconds: c.seconds,
    };
  }
  return head;
}

/** An event as one line of text. */
export function eventText(ev: JobEvent): string {
  const what = ((): string => {
    if (ev.partyJoined !== undefined) return `party ${ev.partyJoined.party} joined`;
    if (ev.uploadProgress !== undefined) {
      const u = ev.uploadProgress;
      return `upload ${u.party}: ${u.tensorsReceived}/${u.tensorsExpected} tensors, ${formatBytes(Number(u.bytesReceived))}`;
    }
    if (ev.uploadComplete !== undefined) return `upload ${ev.uploadComplete.party}: complete`;
    if (ev.stateChanged !== undefined)
      return `state ${jobStateName(ev.stateChanged.from)} → ${jobStateName(ev.stateChanged.to)}`;
    if (ev.evaluationDone !== undefined)
      return ev.evaluationDone.evaluation === undefined
        ? 'evaluation'
        : `evaluation ${evaluationText(ev.evaluationDone.evaluation)}`;
    if (ev.factorsChosen !== undefined) {
      const f = ev.factorsChosen;
      return `factors ${f.party}: ${factors(f.factors)} (domain ratio ${(100 * f.domainRatio).toFixed(2)}%)`;
    }
    if (ev.mergeProgress !== undefined)
      return `merge ${ev.mergeProgress.tensorsDone}/${ev.mergeProgress.tensorsTotal} tensors`;
    if (ev.merged !== undefined) return `merged: ${ev.merged.files.length} files in ${ev.merged.seconds.toFixed(1)} s`;
    if (ev.failed !== undefined) return `failed: ${ev.failed.reason}`;
    if (ev.paused !== undefined) return `paused: ${pauseText(ev.paused)}`;
    if (ev.partyStopped !== undefined) return `party ${ev.partyStopped.party} stopped: ${ev.partyStopped.reason}`;
    if (ev.securePhaseClosed !== undefined) {
      const c = ev.securePhaseClosed;
      const missing = c.missing.length === 0 ? '' : `, missing ${c.missing.join(', ')}`;
      const union = c.phase === SecurePhase.SECURE_PHASE_SUPPORT ? `, union ${c.unionSize} positions` : '';
      return `secure phase ${securePhaseName(c.phase)} closed after ${c.seconds.toFixed(1)} s: ${c.parties} part${c.parties === 1 ? 'y' : 'ies'}${missing}${union}; now ${securePhaseName(c.next)}`;
    }
    return 'unknown event';
  })();
  return `${ev.time === '' ? '' : `${ev.time} `}#${ev.seq} ${what}`;
}
