/**
 * The algorithm rules both sides speak: pruning methods and outside-tensor
 * policies, partition levels, the DPA amplification rule and the factor
 * search with its score. Pure code (no server, no client, no I/O); see
 * docs/design/algorithm-rules.md.
 */
export { partitionFactor } from './amplification.js';
export { domainRatio } from './domain-ratio.js';
export { factorKey, memoised, searchDefaults, searchFactors } from './factor-search.js';
export type { FactorSearchOptions, FactorSearchResult, ScoreFn, SearchMethod, Tuner } from './factor-search.js';
export {
  DEFAULT_OUTSIDE_POLICY,
  OUTSIDE_POLICIES,
  outsidePolicyFromWire,
  outsidePolicyToWire,
  parseOutsidePolicy,
  type OutsidePolicy,
} from './outside-policy.js';
export { checkLevels, defaultLevels } from './partition-levels.js';
export {
  DEFAULT_PRUNE_METHOD,
  parsePruneMethod,
  PRUNE_METHODS,
  pruneMethodFromWire,
  pruneMethodToWire,
  type PruneMethod,
} from './prune-method.js';
export { searchOptions } from './search-config.js';
export { oneOfWords, UnknownValueError } from './unknown-value.js';
export { wordEnum, type WordEnum, type WordEnumSpec } from './word-enum.js';
