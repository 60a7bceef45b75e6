/**
 * Tokenizer descriptions for the ONNX evaluator; only a character-level tokenizer is built in.
 * See docs/design/onnx-evaluator.md.
 */
import { readFile } from 'node:fs/promises';
import { TokenizerError } from './errors.js';

/** Turns text into token ids and back. */
export interface Tokenizer {
  /** Number of entries in the vocabulary (ids are `0 … vocabSize − 1`). */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, put before every prompt, if the tokenizer has one. */
  readonly bos: number | undefined;
  /** End-of-sequence id, if any (not used by the metrics: answers are not terminated). */
  readonly eos: number | undefined;
  /** Padding id, if any (the evaluator never pads: it batches sequences of equal length). */
  readonly pad: number | undefined;
  /**
   * Encodes text, without adding special tokens.
   * @throws TokenizerError naming the first character that is not in the vocabulary.
   */
  encode(text: string): number[];
  /**
   * Decodes ids, special tokens included as their vocabulary strings.
   * @throws TokenizerError for an id outside the vocabulary.
   */
  decode(ids: readonly number[]): string;
}

/**
 * The JSON description of a character-level tokenizer: every non-special entry
 * of `vocab` is one Unicode character (code point); `bos`, `eos` and `pad` are
 * indices into `vocab` whose strings (such as `"<bos>"`) are never produced by
 * `encode`.
 */
export interface CharTokenizerDescription {
  type: 'char';
  vocab: string[];
  bos?: number;
  eos?: number;
  pad?: number;
}

/** A character-level tokenizer: one token per Unicode code point. */
export class CharTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bos: number | undefined;
  readonly eos: number | undefined;
  readonly pad: number | undefined;
  readonly #vocab: readonly string[];
  readonly #ids = new Map<string, number>();

  /**
   * @param d The description.
   * @param file The file it came from, for error messages.
   * @throws TokenizerError if the description is inconsistent.
   */
  constructor(d: CharTokenizerDescription, file?: string) {
    const fail = (m: string): never => {
      throw new TokenizerError(m, { file });
    };
    if (!Array.isArray(d.vocab) || d.vocab.length === 0 || !d.vocab.every((v) => typeof v === 'string')) {
      fail('"vocab" must be a non-empty array of strings');
    }
    this.#vocab = d.vocab.slice();
    this.vocabSize = d.vocab.length;
    const special = (key: 'bos' | 'eos' | 'pad'): number | undefined => {
      const id = d[key];
      if (id === undefined || id === null) return undefined;
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        fail(`"${key}" must be an index into "vocab" (0 … ${this.vocabSize - 1}), got ${JSON.stringify(id)}`);
      }
      return id;
    };
    this.bos = special('bos');
    this.eos = special('eos');
    this.pad = special('pad');
    const specials = new Set([this.bos, this.eos, this.pad].filter((x) => x !== undefined));
    d.vocab.forEach((entry, id) => {
      if (specials.has(id)) return;
      // A multi-character entry could never be produced by a character-level encoder: a typo, not a token.
      if ([...entry].length !== 1)
        fail(
          `vocab[${id}] = ${JSON.stringify(entry)} must be exactly one character (or be named by "bos", "eos" or "pad")`,
        );
      const prior = this.#ids.get(entry);
      if (prior !== undefined) fail(`vocab[${id}] repeats vocab[${prior}] = ${JSON.stringify(entry)}`);
      this.#ids.set(entry, id);
    });
  }

  encode(text: string): number[] {
    const out: number[] = [];
    let column = 0;
    for (const ch of text) {
      const id = this.#ids.get(ch);
      if (id === undefined) {
        const code = ch.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0');
        throw new TokenizerError(
          `character ${JSON.stringify(ch)} (U+${code}) at position ${column} is not in the tokenizer's vocabulary`,
        );
      }
      out.push(id);
      column++;
    }
    return out;
  }

  decode(ids: readonly number[]): string {
    return ids
      .map((id) => {
        const s = this.#vocab[id];
        if (s === undefined)
          throw new TokenizerError(`token id ${id} is outside the vocabulary (size ${this.vocabSize})`);
        return s;
      })
      .join('');
  }
}

/**
 * Builds a tokenizer from its parsed JSON description.
 * @param json The parsed description.
 * @param file The file it came from, for error messages.
 * @throws TokenizerError for an unknown `type` or an invalid description.
 */
export function parseTokenizer(json: unknown, file?: string): Tokenizer {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new TokenizerError('a tokenizer description must be a JSON object', { file });
  }
  const type = (json as { type?: unknown }).type;
  if (type !== 'char') {
    throw new TokenizerError(
      `tokenizer type ${JSON.stringify(type)} is not supported (only "char"; give other tokenizers' ids as "prompt_ids"/"answer_ids" in the task files)`,
      { file },
    );
  }
  return new CharTokenizer(json as CharTokenizerDescription, file);
}

/**
 * Reads a tokenizer description (JSON file).
 * @throws TokenizerError if the file is not valid JSON or not a valid description.
 */
export async function loadTokenizer(path: string): Promise<Tokenizer> {
  const text = await readFile(path, 'utf8');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new TokenizerError(`not valid JSON: ${(cause as Error).message}`, { file: path, cause });
  }
  return parseTokenizer(json, path);
}
