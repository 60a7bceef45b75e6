/**
 * Checks a party's DeltaHeader against its job and the job's base checkpoint
 * before any tensor of it is accepted.
 */
import {
  checkLevels,
  outsidePolicyFromWire,
  pruneMethodFromWire,
  type PruneMethod,
} from '../../proto/algorithm/index.js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { formatVersionProblem, storageDtype } from '../../proto/sparse/index.js';
import { FailedPreconditionError, InvalidArgumentError } from '../errors.js';
import { partyFactors } from '../jobs/job-spec.js';
import { stateName, type StoredJob } from '../jobs/job-store.js';

/** @throws FailedPreconditionError unless the job still takes uploads. */
export function requireCollecting(job: StoredJob): void {
  if (job.state !== JobState.JOB_STATE_COLLECTING) {
    throw new FailedPreconditionError(`job ${job.id} is ${stateName(job.state)}: it no longer takes uploads`);
  }
}

/**
 * Checks that a header fits the job: same base, method and rate; a known outside policy; partition
 * levels decreasing and ending at the rate; as many partitions as the job's
 * fixed factors; a known value precision; every planned tensor of a known kind,
 * with one rate per level, present in the base with the same shape.
 * @param baseShapes - Shape of every tensor of the job's base checkpoint.
 * @throws FailedPreconditionError when the delta was made for another base, method, rate or factor count, or
 *   carries fine-tuned weights to a secure job.
 * @throws InvalidArgumentError when the header is malformed or plans a tensor the base lacks or shapes differently.
 */
export function checkDeltaHeader(
  job: StoredJob,
  party: string,
  header: DeltaHeader,
  baseShapes: ReadonlyMap<string, readonly number[]>,
): void {
  if (header.valueKind !== ValueKind.VALUE_KIND_UNSPECIFIED && header.valueKind !== ValueKind.VALUE_KIND_FINETUNED)
    throw new InvalidArgumentError(
      'DeltaHeader value_kind: the upload is a merged patch (or of an unknown kind), not a delta',
    );
  const versionProblem = formatVersionProblem(header);
  if (versionProblem !== undefined) throw new InvalidArgumentError(versionProblem);
  if (header.baseFingerprint !== job.baseFingerprint) {
    throw new FailedPreconditionError(
      `the delta was made against base ${header.baseFingerprint || '(none)'}, but job ${job.id} merges into base ${job.baseFingerprint}`,
    );
  }
  const method = headerMethod(header);
  if (method !== job.method) {
    throw new FailedPreconditionError(
      `the delta was pruned with method ${JSON.stringify(method ?? '')}, job ${job.id} requires ${JSON.stringify(job.method)}`,
    );
  }
  if (method === 'dare' && header.valueKind === ValueKind.VALUE_KIND_FINETUNED)
    throw new InvalidArgumentError(
      'DeltaHeader value_kind: DARE rescales its kept values, so they must travel as deltas, not fine-tuned weights',
    );
  // The masked vectors are summed and scaled as deltas: a support whose values would be F is refused.
  if (job.secure !== undefined && header.valueKind === ValueKind.VALUE_KIND_FINETUNED)
    throw new FailedPreconditionError(
      `DeltaHeader value_kind: job ${job.id} is secure, its masked values are summed as deltas F - B, not fine-tuned weights (prune with --value-kind delta)`,
    );
  if (header.rate !== job.rate)
    throw new FailedPreconditionError(
      `the delta was pruned at rate ${header.rate}, job ${job.id} requires ${job.rate}`,
    );
  asInvalidArgument(() => outsidePolicyFromWire(header.outside, header.options['outside'] ?? '', 'DeltaHeader '));
  asInvalidArgument(() => checkLevels(header.levels, header.rate), 'DeltaHeader ');
  const positionsOnly = header.valueDtype === ValueDtype.VALUE_DTYPE_NONE;
  // A secure job takes supports (positions only): values travel masked, never in clear.
  if (job.secure !== undefined && !positionsOnly)
    throw new FailedPreconditionError(
      `job ${job.id} is secure: upload your support only (DeltaHeader value_dtype NONE); values go masked through SecureAggregationService.UploadMasked`,
    );
  if (job.secure !== undefined && job.secure.phase !== 'SECURE_PHASE_SUPPORT')
    throw new FailedPreconditionError(`job ${job.id} no longer takes supports: the union is fixed`);
  if (job.secure === undefined && positionsOnly)
    throw new FailedPreconditionError(
      `job ${job.id} is not secure: DeltaHeader value_dtype NONE (positions only) is refused`,
    );
  if (!positionsOnly && storageDtype(header.valueDtype) === undefined)
    throw new InvalidArgumentError(`DeltaHeader value_dtype: ${header.valueDtype} is not a known precision`);
  // Off and search fit any number of partitions; fixed factors fit only their own number.
  const factors = job.dpa.fixed === undefined ? undefined : partyFactors(job, party, header.levels.length)!;
  if (factors !== undefined && factors.length !== header.levels.length) {
    throw new FailedPreconditionError(
      `job ${job.id} fixes ${factors.length} amplification factor(s) for party ${party}, but the delta has ${header.levels.length} partition(s) (levels ${header.levels.join(', ')})`,
    );
  }
  const names = new Set<string>();
  for (const t of header.tensors) {
    if (names.has(t.name)) throw new InvalidArgumentError(`tensor "${t.name}" is planned twice in the header`);
    names.add(t.name);
    if (t.kind !== TensorKind.TENSOR_KIND_LINEAR && t.kind !== TensorKind.TENSOR_KIND_OUTSIDE) {
      throw new InvalidArgumentError(`tensor "${t.name}": kind ${t.kind} is not LINEAR or OUTSIDE`);
    }
    if (t.levelRates.length !== header.levels.length) {
      throw new InvalidArgumentError(
        `tensor "${t.name}": ${t.levelRates.length} level rate(s), the header has ${header.levels.length} level(s)`,
      );
    }
    const expected = baseShapes.get(t.name);
    if (expected === undefined) throw new InvalidArgumentError(`tensor "${t.name}" is not in the base checkpoint`);
    if (!sameShape(t.shape, expected)) {
      throw new InvalidArgumentError(
        `tensor "${t.name}": shape [${t.shape.join(', ')}] in the delta, the base has [${expected.join(', ')}]`,
      );
    }
  }
}

/**
 * The method a header records: `prune_method`, else the text of an older
 * client; undefined when neither is set.
 * @throws InvalidArgumentError naming the field for a method this server does not know.
 */
function headerMethod(header: DeltaHeader): PruneMethod | undefined {
  return asInvalidArgument(() => pruneMethodFromWire(header.pruneMethod, header.method, 'DeltaHeader '));
}

/**
 * `check()`, with the RangeError of a refused value (UnknownValueError is one)
 * turned into INVALID_ARGUMENT; any other error passes unchanged.
 */
function asInvalidArgument<T>(check: () => T, prefix = ''): T {
  try {
    return check();
  } catch (err) {
    if (err instanceof RangeError) throw new InvalidArgumentError(`${prefix}${err.message}`, { cause: err });
    throw err;
  }
}

/** True if a wire shape (bigint dimensions) equals a checkpoint shape. */
export function sameShape(shape: readonly bigint[], expected: readonly number[]): boolean {
  return shape.length === expected.length && shape.every((d, i) => d === BigInt(expected[i]!));
}
