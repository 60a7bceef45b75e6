/**
 * The scores a party reports for a DPA candidate (task name → finite number), checked on both sides.
 * See docs/design/federated-evaluation.md.
 */

/** Why reported scores cannot be used; the message reads after "the scores are bad because …". */
export class ScoresError extends Error {
  override name = 'ScoresError';
}

/**
 * Checks reported scores.
 * @returns A plain copy of them.
 * @throws ScoresError saying what is wrong: not an object, no task, or a score that is not a finite number.
 */
export function checkScores(value: unknown): Record<string, number> {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new ScoresError('they are not an object { "task": number }');
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length === 0) throw new ScoresError('they name no task');
  for (const [task, score] of entries) {
    if (typeof score !== 'number' || !Number.isFinite(score)) {
      throw new ScoresError(
        `the score of ${JSON.stringify(task)} is ${typeof score === 'number' ? String(score) : JSON.stringify(score)}, not a finite number`,
      );
    }
  }
  return Object.fromEntries(entries) as Record<string, number>;
}
