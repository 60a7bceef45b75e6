/**
 * A setting spoken both as words (SDK, CLI, options) and as a schema enum,
 * with the checks that turn untyped or decoded input into one of its words.
 */
import { oneOfWords, UnknownValueError } from './unknown-value.js';

/** How a setting is coded and named on the wire. */
export interface WordEnumSpec<W extends string, E extends number> {
  /** The words, in the order they are listed to people. */
  words: readonly W[];
  /** The enum value of each word (0 is UNSPECIFIED). */
  wire: Readonly<Record<W, E>>;
  /** The generated enum, for the names of its values. */
  names: Readonly<Record<number, string>>;
  /** The enum field and the older text field, as named in errors. */
  fields: readonly [enumField: string, textField: string];
}

/** The checks of one setting. */
export interface WordEnum<W extends string, E extends number> {
  /** @throws UnknownValueError naming `field` unless `value` is one of the words. */
  parse: (value: unknown, field: string) => W;
  toWire: (word: W) => E;
  /**
   * The word a decoded message carries: its enum, else (a writer older than
   * that field) its text; undefined when neither is set. Both set must agree.
   * @param prefix - Put before the field names in errors, e.g. `DeltaHeader `.
   * @throws UnknownValueError naming the enum or text field for a value this code does not know.
   * @throws RangeError naming the enum field when the two disagree.
   */
  fromWire: (wire: E, legacy: string, prefix?: string) => W | undefined;
}

/** The checks of the setting `spec` describes. */
export function wordEnum<W extends string, E extends number>(spec: WordEnumSpec<W, E>): WordEnum<W, E> {
  const { words, wire: toWire, names, fields } = spec;
  const [enumField, textField] = fields;
  const parse = (value: unknown, field: string): W => oneOfWords(value, field, words);
  return {
    parse,
    toWire: (word) => toWire[word],
    fromWire: (wire, legacy, prefix = '') => {
      const fromText = legacy === '' ? undefined : parse(legacy, `${prefix}${textField}`);
      if (wire === 0) return fromText;
      const fromEnum = words.find((w) => toWire[w] === wire);
      if (fromEnum === undefined)
        throw new UnknownValueError(
          `${prefix}${enumField}`,
          String(wire),
          words.map((w) => names[toWire[w]] ?? String(toWire[w])),
        );
      if (fromText !== undefined && fromText !== fromEnum) {
        throw new RangeError(
          `${prefix}${enumField}: ${names[wire]} disagrees with ${prefix}${textField} ${JSON.stringify(legacy)} (set one, or both to the same value)`,
        );
      }
      return fromEnum;
    },
  };
}
