/**
 * The DPA factor search (spec "DPA"): one factor per partition, tuned one at a
 * time to maximise a party's score (its Domain-Ratio). Deterministic, so that a
 * search is resumed by replaying its recorded scores (docs/design/algorithm-rules.md).
 */

/** Method 1 adds partitions one by one; Method 2 starts with all of them. */
export type SearchMethod = 'progressive' | 'whole';
/** How one factor is tuned. */
export type Tuner = 'greedy' | 'golden';

/** Settings of a factor search. */
export interface FactorSearchOptions {
  /** Number of partitions P (one factor each). */
  partitions: number;
  /** @default 'whole' (Method 2; docs/dpa.md says why) */
  method?: SearchMethod;
  /** @default 'greedy' */
  tuner?: Tuner;
  /** Start value of partition 1's factor (later partitions start at 1). @default 1.0 (the released code used 1.8) */
  start?: number;
  /** Greedy step. @default 0.1 */
  step?: number;
  /** Largest factor. @default 10 */
  upper?: number;
  /** Smallest factor. @default 0 */
  lower?: number;
  /** Golden-section: evaluations per factor. @default 12 */
  budget?: number;
  /** Search downwards (factors at most their start), for DARE + DPA. @default false */
  downward?: boolean;
}

/** Scores a candidate factor vector (higher is better). */
export type ScoreFn = (factors: number[], signal?: AbortSignal) => Promise<number>;

/** The outcome of a search. */
export interface FactorSearchResult {
  factors: number[];
  score: number;
  /** Number of calls to the score function (each candidate is scored once). */
  evaluations: number;
}

type Resolved = Required<FactorSearchOptions>;

/**
 * Fills in defaults and checks the settings.
 * @throws RangeError naming the setting.
 */
export function searchDefaults(o: FactorSearchOptions): Resolved {
  const r: Resolved = {
    partitions: o.partitions,
    method: o.method ?? 'whole',
    tuner: o.tuner ?? 'greedy',
    start: o.start ?? 1,
    step: o.step ?? 0.1,
    upper: o.upper ?? 10,
    lower: o.lower ?? 0,
    budget: o.budget ?? 12,
    downward: o.downward ?? false,
  };
  if (!Number.isInteger(r.partitions) || r.partitions < 1)
    throw new RangeError(`partitions: must be a positive integer, got ${r.partitions}`);
  if (!(r.step > 0)) throw new RangeError(`step: must be positive, got ${r.step}`);
  if (!(r.lower >= 0 && r.lower <= r.start && r.start <= r.upper)) {
    throw new RangeError(`start: must lie in [lower, upper] = [${r.lower}, ${r.upper}], got ${r.start}`);
  }
  if (!Number.isInteger(r.budget) || r.budget < 3)
    throw new RangeError(`budget: must be an integer ≥ 3, got ${r.budget}`);
  return r;
}

/** Removes the float noise of repeated steps (1.1 + 0.1 = 1.2000000000000002). */
function tidy(x: number): number {
  return Math.round(x * 1e9) / 1e9;
}

/** The released code's climb: step from `from` while the score improves, keep the last improvement. */
async function climb(
  score: (f: number) => Promise<number>,
  from: number,
  o: Resolved,
): Promise<{ f: number; s: number }> {
  const dir = o.downward ? -1 : 1;
  let best = { f: from, s: await score(from) };
  for (;;) {
    const next = tidy(best.f + dir * o.step);
    if (next > o.upper + 1e-12 || next < o.lower - 1e-12) return best;
    const s = await score(next);
    if (!(s > best.s)) return best;
    best = { f: next, s };
  }
}

const INV_PHI = (Math.sqrt(5) - 1) / 2;

/**
 * Golden-section search for the maximum of a unimodal score on
 * `[from, upper]` (upward) or `[lower, from]` (downward), with `budget`
 * evaluations; the start value itself is always evaluated, so the result is
 * never worse than it.
 */
async function golden(
  score: (f: number) => Promise<number>,
  from: number,
  o: Resolved,
): Promise<{ f: number; s: number }> {
  let a = o.downward ? o.lower : from;
  let b = o.downward ? from : o.upper;
  let best = { f: from, s: await score(from) };
  const seen = (f: number, s: number): number => {
    if (s > best.s) best = { f, s };
    return s;
  };
  let c = tidy(b - INV_PHI * (b - a));
  let d = tidy(a + INV_PHI * (b - a));
  let fc = seen(c, await score(c));
  let fd = seen(d, await score(d));
  for (let used = 3; used < o.budget; used++) {
    if (fc >= fd) {
      b = d;
      d = c;
      fd = fc;
      c = tidy(b - INV_PHI * (b - a));
      fc = seen(c, await score(c));
    } else {
      a = c;
      c = d;
      fc = fd;
      d = tidy(a + INV_PHI * (b - a));
      fd = seen(d, await score(d));
    }
  }
  return best;
}

/**
 * Runs the search. Method 1 (`progressive`): `[s, 0, …]`, tune f1; then add
 * partition 2 at 1 and tune it with f1 fixed; and so on. Method 2 (`whole`):
 * `[s, 1, …, 1]`, tune f1, then f2, … in turn.
 * @throws RangeError for bad settings; whatever `score` throws.
 */
export async function searchFactors(
  options: FactorSearchOptions,
  score: ScoreFn,
  signal?: AbortSignal,
): Promise<FactorSearchResult> {
  const o = searchDefaults(options);
  const factors = Array.from({ length: o.partitions }, (_, p) => (p === 0 ? o.start : o.method === 'whole' ? 1 : 0));
  let evaluations = 0;
  let best = -Infinity;
  // Method 2 starts each factor's tuning at the vector the previous one ended
  // on: answer such repeats from here rather than scoring them twice.
  const scored = new Map<string, number>();
  for (let p = 0; p < o.partitions; p++) {
    if (o.method === 'progressive' && p > 0) factors[p] = 1;
    const at = async (f: number): Promise<number> => {
      signal?.throwIfAborted();
      const candidate = factors.slice();
      candidate[p] = f;
      const key = factorKey(candidate);
      const known = scored.get(key);
      if (known !== undefined) return known;
      evaluations++;
      const s = await score(candidate, signal);
      scored.set(key, s);
      return s;
    };
    const tuned = await (o.tuner === 'golden' ? golden : climb)(at, factors[p]!, o);
    factors[p] = tuned.f;
    best = tuned.s;
  }
  return { factors, score: best, evaluations };
}

/** A key for a factor vector, stable across runs. */
export function factorKey(factors: readonly number[]): string {
  return factors.map((f) => tidy(f).toString()).join(',');
}

/**
 * Wraps a score function so that candidates already scored (from a record of
 * earlier evaluations) are answered from the record, and new ones are scored
 * and passed to `record`.
 */
export function memoised(
  known: ReadonlyMap<string, number>,
  score: ScoreFn,
  record: (factors: number[], score: number) => void | Promise<void>,
): ScoreFn {
  const cache = new Map(known);
  return async (factors, signal) => {
    const key = factorKey(factors);
    const hit = cache.get(key);
    if (hit !== undefined) return hit;
    const s = await score(factors, signal);
    cache.set(key, s);
    await record(factors, s);
    return s;
  };
}
