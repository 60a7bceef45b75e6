/**
 * The score a DPA factor search maximises for a party: how close a candidate
 * model comes to the party's dense fine-tuned model on its tasks.
 */

/**
 * Domain-Ratio (paper eq. 7-8): the geometric mean over tasks of
 * `score(candidate, task) / score(dense, task)`, as a fraction (1 = 100%).
 * A task whose dense score is 0 is left out (its ratio is undefined).
 * @throws RangeError if a task has no dense score or no task is usable.
 */
export function domainRatio(
  candidate: Readonly<Record<string, number>>,
  dense: Readonly<Record<string, number>>,
): number {
  let logSum = 0;
  let n = 0;
  for (const [task, s] of Object.entries(candidate)) {
    const d = dense[task];
    if (d === undefined)
      throw new RangeError(`task ${JSON.stringify(task)} has no score for the dense fine-tuned model`);
    if (d === 0) continue;
    if (s <= 0) return 0;
    logSum += Math.log(s / d);
    n++;
  }
  if (n === 0) throw new RangeError('no task with a non-zero dense score: the Domain-Ratio is undefined');
  return Math.exp(logSum / n);
}
