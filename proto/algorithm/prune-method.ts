/**
 * The pruning methods a party may use, defined once for both sides: the words
 * of the SDK and CLI, their schema enum `dppa.v1.PruneMethod`, and the checks
 * that turn untyped input (options, flags, decoded messages) into one of them.
 */
import { PruneMethod as WirePruneMethod } from '../gen/dppa/v1/algorithm.js';
import { oneOfWords, UnknownValueError } from './unknown-value.js';

/** DP (the paper's method) and the baselines, in the order they are listed to people. */
export const PRUNE_METHODS = ['dp', 'magnitude', 'owl', 'dare'] as const;
/** A pruning method: DP or a baseline. */
export type PruneMethod = (typeof PRUNE_METHODS)[number];
/** The method of a job or prune that names none. */
export const DEFAULT_PRUNE_METHOD: PruneMethod = 'dp';

const TO_WIRE: Record<PruneMethod, WirePruneMethod> = {
  dp: WirePruneMethod.PRUNE_METHOD_DP,
  magnitude: WirePruneMethod.PRUNE_METHOD_MAGNITUDE,
  owl: WirePruneMethod.PRUNE_METHOD_OWL,
  dare: WirePruneMethod.PRUNE_METHOD_DARE,
};

/**
 * A method given as text (an option, a flag, a stored file).
 * @param field - Names the input in the error, e.g. `method` or `--method`.
 * @throws UnknownValueError unless `value` is one of {@link PRUNE_METHODS}.
 */
export function parsePruneMethod(value: unknown, field: string): PruneMethod {
  return oneOfWords(value, field, PRUNE_METHODS);
}

/** The schema's enum value of a method. */
export function pruneMethodToWire(method: PruneMethod): WirePruneMethod {
  return TO_WIRE[method];
}

/**
 * The method a decoded message carries: its `prune_method` enum, else (a writer
 * older than that field) its deprecated `method` text; undefined when neither
 * is set. Both set must agree.
 * @param prefix - Put before the field names in errors, e.g. `DeltaHeader `.
 * @throws UnknownValueError naming `prune_method` or `method` for a value this code does not know.
 * @throws RangeError naming `prune_method` when the two disagree.
 */
export function pruneMethodFromWire(wire: WirePruneMethod, legacy: string, prefix = ''): PruneMethod | undefined {
  const fromText = legacy === '' ? undefined : parsePruneMethod(legacy, `${prefix}method`);
  if (wire === WirePruneMethod.PRUNE_METHOD_UNSPECIFIED) return fromText;
  const fromEnum = PRUNE_METHODS.find((m) => TO_WIRE[m] === wire);
  const names = PRUNE_METHODS.map((m) => WirePruneMethod[TO_WIRE[m]]);
  if (fromEnum === undefined) throw new UnknownValueError(`${prefix}prune_method`, String(wire), names);
  if (fromText !== undefined && fromText !== fromEnum) {
    throw new RangeError(`${prefix}prune_method: ${WirePruneMethod[wire]} disagrees with ${prefix}method ${JSON.stringify(legacy)} (set one, or both to the same method)`);
  }
  return fromEnum;
}
