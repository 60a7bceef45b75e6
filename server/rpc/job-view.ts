/**
 * A stored job as the API shows it: settings, state, and each party's
 * progress read from its spool.
 */
import { pruneMethodToWire } from '../../proto/algorithm/index.js';
import { Privacy, SecurePhase, type Job, type PartyStatus, type Pause } from '../../proto/gen/dppa/v1/jobs.js';
import { partyFactors, searchesFactors } from '../jobs/job-spec.js';
import type { StoredJob } from '../jobs/job-store.js';
import { partyIndex, phaseOf } from '../secure/secure-record.js';
import type { PartySpool } from '../uploads/spool.js';

/**
 * The `Job` message of a stored job.
 * @param spools - The parties' spools (Spool.ofJob).
 * @param pause - Set while a storage failure holds the job up (JobRunner.pause).
 */
export function jobView(job: StoredJob, spools: ReadonlyMap<string, PartySpool>, pause: Pause | undefined): Job {
  return {
    id: job.id,
    label: job.label,
    state: job.state,
    basePath: job.basePath,
    baseFingerprint: job.baseFingerprint,
    rate: job.rate,
    // The text too, for clients older than prune_method.
    method: job.method,
    pruneMethod: pruneMethodToWire(job.method),
    dpa: job.dpa,
    merge: job.merge,
    parties: job.parties.map((p): PartyStatus => {
      const s = spools.get(p.name)!;
      const factors = partyFactors(job, p.name, s.header?.levels.length);
      return {
        name: p.name,
        tensorsReceived: s.held.size,
        tensorsExpected: s.expected,
        bytesReceived: BigInt(s.heldBytes),
        uploadComplete: s.complete,
        factors: factors ?? [],
        // Fixed factors (and DPA off) are final as soon as they are known; searched ones once chosen.
        factorsFinal: !searchesFactors(job) || p.chosen !== undefined,
        stoppedReason: p.stoppedReason ?? '',
        secureIndex: job.secure === undefined ? 0 : partyIndex(job.parties, p.name),
      };
    }),
    evaluations: job.evaluations,
    failureReason: job.failureReason,
    createdAt: job.createdAt,
    updatedAt: job.updatedAt,
    maxAbsValue: job.maxAbsValue,
    pause,
    privacy: job.secure === undefined ? Privacy.PRIVACY_PLAIN : Privacy.PRIVACY_SECURE,
    threshold: job.secure?.threshold ?? 0,
    clipBound: job.secure?.clipBound ?? 0,
    securePhase: job.secure === undefined ? SecurePhase.SECURE_PHASE_UNSPECIFIED : phaseOf(job.secure),
    securePhaseSeconds: job.secure?.phaseSeconds ?? 0,
  };
}
