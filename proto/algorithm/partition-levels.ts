/**
 * Partition levels: the decreasing pruning rates whose nested kept sets cut a
 * delta into partitions 1..P (spec "Partitions"); the last level is the target
 * rate.
 */

/** Tolerance when comparing the last level with the target rate (both decoded from the same decimal). */
const LEVEL_EPSILON = 1e-12;

/** Partition levels `0.9, 0.8, …` down to `target` in steps of 0.1 (spec "Partitions"). */
export function defaultLevels(target: number): number[] {
  const levels: number[] = [];
  for (let tenths = 9; tenths / 10 > target + 1e-9; tenths--) levels.push(tenths / 10);
  levels.push(target);
  return levels;
}

/**
 * Checks a level list: decreasing, within [0, 1), ending at the target.
 * @throws RangeError naming what is wrong (`levels: …`).
 */
export function checkLevels(levels: readonly number[], target: number): void {
  if (levels.length === 0) throw new RangeError('levels: at least one partition level is needed');
  levels.forEach((l, i) => {
    if (!(l >= 0 && l < 1)) throw new RangeError(`levels: ${l} is outside [0, 1)`);
    if (i > 0 && !(l < levels[i - 1]!))
      throw new RangeError(`levels: must decrease, but ${levels[i - 1]} is followed by ${l}`);
  });
  if (Math.abs(levels[levels.length - 1]! - target) > LEVEL_EPSILON) {
    throw new RangeError(`levels: the last level must be the target rate ${target}, got ${levels[levels.length - 1]}`);
  }
}
