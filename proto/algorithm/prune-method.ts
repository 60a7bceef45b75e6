/**
 * The pruning methods a party may use, defined once for both sides: the words
 * of the SDK and CLI, their schema enum `dppa.v1.PruneMethod`, and the checks
 * that turn untyped input (options, flags, decoded messages) into one of them.
 */
import { PruneMethod as W } from '../gen/dppa/v1/algorithm.js';
import { wordEnum } from './word-enum.js';

/** DP (the paper's method) and the baselines, in the order they are listed to people. */
export const PRUNE_METHODS = ['dp', 'magnitude', 'owl', 'dare'] as const;
/** A pruning method: DP or a baseline. */
export type PruneMethod = (typeof PRUNE_METHODS)[number];
/** The method of a job or prune that names none. */
export const DEFAULT_PRUNE_METHOD: PruneMethod = 'dp';

const METHOD = wordEnum<PruneMethod, W>({
  words: PRUNE_METHODS,
  wire: {
    dp: W.PRUNE_METHOD_DP,
    magnitude: W.PRUNE_METHOD_MAGNITUDE,
    owl: W.PRUNE_METHOD_OWL,
    dare: W.PRUNE_METHOD_DARE,
  },
  names: W,
  fields: ['prune_method', 'method'],
});

/**
 * `parsePruneMethod(value, field)`: a method given as text (an option, a flag, a stored file), or
 * UnknownValueError naming `field`. `pruneMethodToWire`: its schema enum value. `pruneMethodFromWire(wire,
 * legacy, prefix)`: the method a decoded message carries, `prune_method` else the deprecated `method` text
 * (UnknownValueError naming the field for an unknown one, RangeError when the two disagree).
 */
export const { parse: parsePruneMethod, toWire: pruneMethodToWire, fromWire: pruneMethodFromWire } = METHOD;
