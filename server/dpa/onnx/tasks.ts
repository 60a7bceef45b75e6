/**
 * Validation tasks: JSONL files of prompt/answer pairs (text or token ids), tokenized once; errors name file and
 * line. See docs/onnx-evaluator.md ("Tasks").
 */
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import { TaskDataError, TokenizerError } from './errors.js';
import type { Tokenizer } from './tokenizer.js';

/** A task to load: its name (the key of its score) and its JSONL file. */
export interface TaskSpec {
  name: string;
  file: string;
}

/** One tokenized example. */
export interface TaskExample {
  /** 1-based line in the task file, for messages. */
  line: number;
  /** The context tokens: BOS (if the tokenizer has one) followed by the prompt. Never empty. */
  context: readonly number[];
  /** The answer tokens to predict after the context. Never empty. */
  answer: readonly number[];
}

/** A task whose file has been read and tokenized; reuse it across candidates. */
export interface LoadedTask {
  name: string;
  file: string;
  examples: readonly TaskExample[];
}

function tokenIds(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((x) => Number.isInteger(x) && (x as number) >= 0);
}

/**
 * Parses one non-blank JSONL line.
 * @throws TaskDataError naming file and line.
 */
function parseLine(text: string, file: string, line: number, tokenizer: Tokenizer | undefined): TaskExample {
  const fail = (m: string, cause?: unknown): never => {
    throw new TaskDataError(m, { file, line, cause });
  };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    fail(`not valid JSON: ${(cause as Error).message}`, cause);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) fail('each line must be a JSON object');
  const o = json as Record<string, unknown>;
  let context: number[];
  let answer: number[];
  if ('prompt_ids' in o || 'answer_ids' in o) {
    if (!tokenIds(o.prompt_ids) || !tokenIds(o.answer_ids))
      fail('"prompt_ids" and "answer_ids" must both be arrays of non-negative integers');
    context = o.prompt_ids as number[];
    answer = o.answer_ids as number[];
  } else {
    if (typeof o.prompt !== 'string' || typeof o.answer !== 'string')
      fail('expected string fields "prompt" and "answer" (or "prompt_ids" and "answer_ids")');
    if (tokenizer === undefined)
      fail('text examples need a tokenizer (set tokenizerPath), or give "prompt_ids" and "answer_ids"');
    const tok = tokenizer!;
    try {
      context = tok.encode(o.prompt as string);
      answer = tok.encode(o.answer as string);
    } catch (e) {
      if (e instanceof TokenizerError) fail(e.message, e);
      throw e;
    }
    if (tok.bos !== undefined) context.unshift(tok.bos);
  }
  if (answer.length === 0) fail('the answer is empty: nothing to score');
  // The first answer token is predicted from the last context position, so there must be one.
  if (context.length === 0)
    fail('the prompt is empty and the tokenizer has no "bos": the first answer token has no context');
  return { line, context, answer };
}

/**
 * Reads and tokenizes one task file, streaming it line by line.
 * @param spec The task's name and file.
 * @param tokenizer Needed for text lines; id lines do not use it.
 * @throws TaskDataError naming file and line for a bad line, or the file if it has no example.
 */
export async function loadTask(spec: TaskSpec, tokenizer: Tokenizer | undefined): Promise<LoadedTask> {
  const examples: TaskExample[] = [];
  const input = createReadStream(spec.file, { encoding: 'utf8' });
  const lines = createInterface({ input, crlfDelay: Infinity });
  let line = 0;
  try {
    for await (const text of lines) {
      line++;
      if (text.trim() === '') continue;
      examples.push(parseLine(text, spec.file, line, tokenizer));
    }
  } finally {
    lines.close();
    input.destroy();
  }
  if (examples.length === 0) throw new TaskDataError('the task file has no examples', { file: spec.file });
  return { name: spec.name, file: spec.file, examples };
}

/**
 * Loads several tasks; names must be unique since they key the scores.
 * @throws TaskDataError for a repeated name or a bad file.
 */
export async function loadTasks(specs: readonly TaskSpec[], tokenizer: Tokenizer | undefined): Promise<LoadedTask[]> {
  const seen = new Set<string>();
  for (const s of specs) {
    if (seen.has(s.name))
      throw new TaskDataError(`task name ${JSON.stringify(s.name)} is used twice`, { file: s.file });
    seen.add(s.name);
  }
  const out: LoadedTask[] = [];
  // One after another: the files are small and the errors then come in a stable order.
  for (const s of specs) out.push(await loadTask(s, tokenizer));
  return out;
}
