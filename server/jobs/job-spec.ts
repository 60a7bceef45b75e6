/**
 * What a job asks for: validation of CreateJobRequest settings, and the
 * amplification factors and weights each party's delta is merged with.
 */
import { DEFAULT_PRUNE_METHOD, pruneMethodFromWire, type PruneMethod } from '../../proto/algorithm/index.js';
import {
  MergeOutput,
  Privacy,
  type CreateJobRequest,
  type DpaConfig,
  type MergeOptions,
} from '../../proto/gen/dppa/v1/jobs.js';
import { FixedPointError, fixedPoint } from '../../proto/secure/index.js';
import { checkSearch } from '../dpa/search-spec.js';
import { DEFAULT_SECURE_PHASE_SECONDS, MAX_SECURE_PARTIES, MAX_SECURE_PHASE_SECONDS } from '../secure/secure-record.js';
import { InvalidArgumentError, UnimplementedError } from '../errors.js';
import { DEFAULT_MAX_ABS_VALUE } from '../../proto/sparse/index.js';
import type { StoredJob } from './job-store.js';

export { DEFAULT_MAX_ABS_VALUE };

const PARTY_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_LABEL_LENGTH = 256;

/** The checked settings of a new job (everything but the base checkpoint, checked by opening it). */
export interface JobSettings {
  basePath: string;
  parties: string[];
  rate: number;
  method: PruneMethod;
  dpa: DpaConfig;
  merge: MergeOptions;
  label: string;
  maxAbsValue: number;
  /** Set for a PRIVACY_SECURE job. */
  secure: SecureSettings | undefined;
}

/** The parameters of a secure job. */
export interface SecureSettings {
  threshold: number;
  clipBound: number;
  phaseSeconds: number;
}

/**
 * Checks a CreateJobRequest and fills in defaults (the files of an ONNX
 * evaluator are checked by create-job.ts).
 * @throws InvalidArgumentError naming the field at fault.
 * @throws UnimplementedError for sign election, which this server does not offer yet.
 */
export function checkJobSettings(req: CreateJobRequest): JobSettings {
  if (req.basePath.trim() === '') throw new InvalidArgumentError('base_path: required');
  if (req.parties.length === 0) throw new InvalidArgumentError('parties: at least one party is required');
  const seen = new Set<string>();
  for (const p of req.parties) {
    if (!PARTY_NAME.test(p))
      throw new InvalidArgumentError(`parties: ${JSON.stringify(p)} is not 1-64 letters, digits, '-' or '_'`);
    if (seen.has(p)) throw new InvalidArgumentError(`parties: ${JSON.stringify(p)} appears twice`);
    seen.add(p);
  }
  if (!(req.rate >= 0 && req.rate < 1)) throw new InvalidArgumentError(`rate: must be in [0, 1), got ${req.rate}`);
  const method = requestMethod(req);
  if (req.label.length > MAX_LABEL_LENGTH)
    throw new InvalidArgumentError(`label: at most ${MAX_LABEL_LENGTH} characters`);
  const dpa: DpaConfig = req.dpa ?? { scaleOutsideByMax: false };
  const merge: MergeOptions = req.merge ?? {
    weights: {},
    signElection: false,
    partiesMayDownload: false,
    output: MergeOutput.MERGE_OUTPUT_UNSPECIFIED,
  };
  for (const [party, w] of Object.entries(merge.weights)) {
    if (!seen.has(party))
      throw new InvalidArgumentError(`merge.weights: ${JSON.stringify(party)} is not a party of the job`);
    if (!Number.isFinite(w))
      throw new InvalidArgumentError(`merge.weights[${party}]: must be a finite number, got ${w}`);
  }
  if (!Object.values(MergeOutput).includes(merge.output) || merge.output === MergeOutput.UNRECOGNIZED)
    throw new InvalidArgumentError(`merge.output: ${merge.output} is not dense, patch or both`);
  if (merge.signElection) throw new UnimplementedError('merge.sign_election: TIES sign election is not available yet');
  if (!(req.maxAbsValue >= 0 && Number.isFinite(req.maxAbsValue))) {
    throw new InvalidArgumentError(
      `max_abs_value: must be a finite number > 0 (or 0 for the default ${DEFAULT_MAX_ABS_VALUE}), got ${req.maxAbsValue}`,
    );
  }
  const maxAbsValue = req.maxAbsValue === 0 ? DEFAULT_MAX_ABS_VALUE : req.maxAbsValue;
  // Secure first: its refusal of a server-side search says more than the search's own checks.
  const secure = checkSecure(req, dpa, merge);
  checkDpa(dpa, req.parties);
  return {
    basePath: req.basePath,
    parties: [...req.parties],
    rate: req.rate,
    method,
    dpa,
    merge,
    label: req.label,
    maxAbsValue,
    secure,
  };
}

/**
 * The secure settings of a request, undefined for a plain job. A secure job's
 * amplification and weights are applied by each party (the server sees only the sum).
 * @throws InvalidArgumentError naming the field at fault.
 */
function checkSecure(req: CreateJobRequest, dpa: DpaConfig, merge: MergeOptions): SecureSettings | undefined {
  const n = req.parties.length;
  if (req.privacy !== Privacy.PRIVACY_SECURE) {
    if (req.privacy !== Privacy.PRIVACY_UNSPECIFIED && req.privacy !== Privacy.PRIVACY_PLAIN)
      throw new InvalidArgumentError(`privacy: ${req.privacy} is not PLAIN or SECURE`);
    if (req.threshold !== 0) throw new InvalidArgumentError('threshold: only for privacy SECURE');
    if (req.clipBound !== 0) throw new InvalidArgumentError('clip_bound: only for privacy SECURE');
    if (req.securePhaseSeconds !== 0) throw new InvalidArgumentError('secure_phase_seconds: only for privacy SECURE');
    return undefined;
  }
  if (n > MAX_SECURE_PARTIES)
    throw new InvalidArgumentError(
      `parties: a secure job takes at most ${MAX_SECURE_PARTIES} parties (its protocol state is rewritten with the job record on every message), got ${n}`,
    );
  if (!(Number.isInteger(req.securePhaseSeconds) && req.securePhaseSeconds <= MAX_SECURE_PHASE_SECONDS))
    throw new InvalidArgumentError(
      `secure_phase_seconds: must be at most ${MAX_SECURE_PHASE_SECONDS} (7 days; 0 for the default ${DEFAULT_SECURE_PHASE_SECONDS}), got ${req.securePhaseSeconds}`,
    );
  if (!(Number.isInteger(req.threshold) && req.threshold >= 2 && req.threshold <= n))
    throw new InvalidArgumentError(`threshold: must be in [2, ${n}] (the number of parties), got ${req.threshold}`);
  if (!(Number.isFinite(req.clipBound) && req.clipBound > 0))
    throw new InvalidArgumentError(`clip_bound: must be a finite number > 0, got ${req.clipBound}`);
  try {
    fixedPoint(req.clipBound, n);
  } catch (err) {
    if (err instanceof FixedPointError) throw new InvalidArgumentError(`clip_bound: ${err.message}`, { cause: err });
    throw err;
  }
  if (dpa.search !== undefined) {
    throw new InvalidArgumentError(
      'dpa.search: a secure job cannot search factors on the server (neither the ONNX nor the remote evaluator): each party searches and applies its own before it uploads; give dpa.off',
    );
  }
  const fixed = dpa.fixed;
  if (fixed !== undefined) {
    const lists = [fixed.factors, ...Object.values(fixed.perParty).map((l) => l.factors)];
    if (lists.some((l) => l.some((f) => f !== 1)))
      throw new InvalidArgumentError(
        'dpa.fixed: a secure job takes factors 1 at the server (each party applies its own before it uploads)',
      );
  }
  for (const [party, w] of Object.entries(merge.weights)) {
    if (w !== 1)
      throw new InvalidArgumentError(
        `merge.weights[${party}]: a secure job takes weight 1 at the server (each party applies its own weight before it uploads), got ${w}`,
      );
  }
  return {
    threshold: req.threshold,
    clipBound: req.clipBound,
    phaseSeconds: req.securePhaseSeconds === 0 ? DEFAULT_SECURE_PHASE_SECONDS : req.securePhaseSeconds,
  };
}

/**
 * The method a request asks for: `prune_method`, else the text of an older
 * client, else DP.
 * @throws InvalidArgumentError naming `prune_method` or `method`.
 */
function requestMethod(req: CreateJobRequest): PruneMethod {
  try {
    return pruneMethodFromWire(req.pruneMethod, req.method) ?? DEFAULT_PRUNE_METHOD;
  } catch (err) {
    if (err instanceof RangeError) throw new InvalidArgumentError(err.message, { cause: err });
    throw err;
  }
}

function checkDpa(dpa: DpaConfig, parties: readonly string[]): void {
  if (dpa.search !== undefined) checkSearch(dpa.search, parties);
  const fixed = dpa.fixed;
  if (fixed === undefined) return;
  checkFactorList('dpa.fixed.factors', fixed.factors);
  for (const [party, list] of Object.entries(fixed.perParty)) {
    if (!parties.includes(party))
      throw new InvalidArgumentError(`dpa.fixed.per_party: ${JSON.stringify(party)} is not a party of the job`);
    checkFactorList(`dpa.fixed.per_party[${party}]`, list.factors);
  }
  for (const party of parties) {
    if ((fixed.perParty[party]?.factors ?? fixed.factors).length === 0) {
      throw new InvalidArgumentError(
        `dpa.fixed: no factors for party ${party} (give dpa.fixed.factors or dpa.fixed.per_party[${party}])`,
      );
    }
  }
}

function checkFactorList(field: string, factors: readonly number[]): void {
  for (const f of factors) {
    if (!(Number.isFinite(f) && f >= 0))
      throw new InvalidArgumentError(`${field}: factors must be finite and ≥ 0, got ${f}`);
  }
}

/** True when the job's factors are searched (it goes through the DPA state). */
export function searchesFactors(job: StoredJob): boolean {
  return job.dpa.search !== undefined;
}

/**
 * The amplification factors of a party, partition 1 first: the ones its
 * search chose, the fixed ones, or all 1 when DPA is off (one per partition
 * level). Undefined while not known: the search has not finished, or DPA is
 * off and no header has arrived.
 * @param partitions - Partitions of the party's delta (its header's levels), if known.
 */
export function partyFactors(job: StoredJob, party: string, partitions: number | undefined): number[] | undefined {
  if (searchesFactors(job)) return job.parties.find((p) => p.name === party)?.chosen?.factors;
  const fixed = job.dpa.fixed;
  if (fixed !== undefined) return fixed.perParty[party]?.factors ?? fixed.factors;
  return partitions === undefined ? undefined : new Array<number>(partitions).fill(1);
}

/** Weight c_i of a party's delta in the merge. */
export function partyWeight(job: StoredJob, party: string): number {
  return job.merge.weights[party] ?? 1;
}
