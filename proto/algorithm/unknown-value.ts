/**
 * The error of a setting whose value is not one of the words (or enum
 * numbers) the algorithm knows, naming the field or flag it came from.
 */

/** A value outside a fixed set: `method: expected one of dp, magnitude, owl, dare, got "ties"`. */
export class UnknownValueError extends RangeError {
  override name = 'UnknownValueError';
  /** The field (or flag) as named in the message, e.g. `method`, `prune_method`, `--method`. */
  readonly field: string;
  /** The value given, as text. */
  readonly value: string;
  constructor(field: string, value: string, allowed: readonly string[], options?: ErrorOptions) {
    super(`${field}: expected one of ${allowed.join(', ')}, got ${value}`, options);
    this.field = field;
    this.value = value;
  }
}

/**
 * `value` if it is one of `allowed`.
 * @throws UnknownValueError naming `field` otherwise.
 */
export function oneOfWords<T extends string>(value: unknown, field: string, allowed: readonly T[]): T {
  if (typeof value === 'string' && (allowed as readonly string[]).includes(value)) return value as T;
  throw new UnknownValueError(field, JSON.stringify(value) ?? String(value), allowed);
}
