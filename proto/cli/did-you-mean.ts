/** "Did you mean …?": the closest of some words to a mistyped one. */

/** Optimal string alignment distance (Damerau–Levenshtein with adjacent swaps). */
function distance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)),
  );
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * The candidates nearest to `word` (at most 3 edits, and fewer than a third of
 * the longer word), best first; empty when none is near.
 */
export function closest(word: string, candidates: readonly string[]): string[] {
  let best = Infinity;
  let found: string[] = [];
  for (const c of new Set(candidates)) {
    const n = distance(word, c);
    if (n > 3 || n >= Math.max(word.length, c.length) / 3 + 1) continue;
    if (n < best) [best, found] = [n, [c]];
    else if (n === best) found.push(c);
  }
  return found;
}

/** ` (did you mean --json?)`, or '' when nothing is near. */
export function didYouMean(word: string, candidates: readonly string[]): string {
  const near = closest(word, candidates);
  return near.length === 0 ? '' : ` (did you mean ${near.join(' or ')}?)`;
}
