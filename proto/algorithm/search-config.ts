/**
 * A job's factor search settings (`dppa.v1.SearchConfig`) as the options of
 * `searchFactors`: what a party needs to run its own search the way the
 * server would.
 */
import { SearchMethod, Tuner, type SearchConfig } from '../gen/dppa/v1/jobs.js';
import type { FactorSearchOptions } from './factor-search.js';

/**
 * The options of `searchFactors` for a party whose delta has `partitions`
 * partitions. Proto3 cannot tell an unset number from 0, so 0 takes the
 * default for `start`, `step`, `upper` and `budget` (none can sensibly be 0);
 * `lower` defaults to 0 anyway.
 */
export function searchOptions(s: SearchConfig, partitions: number): FactorSearchOptions {
  const o: FactorSearchOptions = {
    partitions,
    // Unset (0) is Method 2, the default since docs/results.md found it at least Method 1 everywhere (docs/dpa.md).
    method: s.method === SearchMethod.SEARCH_METHOD_PROGRESSIVE ? 'progressive' : 'whole',
    tuner: s.tuner === Tuner.TUNER_GOLDEN ? 'golden' : 'greedy',
    lower: s.lower,
    downward: s.downward,
  };
  if (s.start !== 0) o.start = s.start;
  if (s.step !== 0) o.step = s.step;
  if (s.upper !== 0) o.upper = s.upper;
  if (s.budget !== 0) o.budget = s.budget;
  return o;
}
