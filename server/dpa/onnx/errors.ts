/**
 * Typed errors of the ONNX evaluator, each naming the model tensor or task line to fix; one family, one status.
 * See docs/design/errors.md.
 */

/** Where an evaluator error was found. */
export interface OnnxEvaluatorErrorOptions extends ErrorOptions {
  /** The file concerned (model, tokenizer, name map or task file). */
  file?: string | undefined;
  /** 1-based line of a task file, if the error is about one line. */
  line?: number | undefined;
  /** The tensor concerned (checkpoint or initializer name), if any. */
  tensor?: string | undefined;
}

function locate(message: string, o: OnnxEvaluatorErrorOptions): string {
  if (o.file === undefined) return message;
  return o.line === undefined ? `${o.file}: ${message}` : `${o.file}:${o.line}: ${message}`;
}

/** Base class: the evaluation cannot run as configured. */
export class OnnxEvaluatorError extends Error {
  override name = 'OnnxEvaluatorError';
  readonly file: string | undefined;
  readonly line: number | undefined;
  readonly tensor: string | undefined;
  constructor(message: string, opts: OnnxEvaluatorErrorOptions = {}) {
    super(locate(message, opts), { cause: opts.cause });
    this.file = opts.file;
    this.line = opts.line;
    this.tensor = opts.tensor;
  }
}

/**
 * The model does not follow the evaluator's contract: missing input or output,
 * an initializer the name map names but the graph lacks, a shape or dtype that
 * does not match the checkpoint, a candidate tensor of the wrong size.
 */
export class OnnxModelError extends OnnxEvaluatorError {
  override name = 'OnnxModelError';
}

/** The tokenizer description is invalid, or a text cannot be encoded with it. */
export class TokenizerError extends OnnxEvaluatorError {
  override name = 'TokenizerError';
}

/** A task file has a line that is not a valid example (bad JSON, wrong fields, unknown character, too long). */
export class TaskDataError extends OnnxEvaluatorError {
  override name = 'TaskDataError';
}

/** The requested ONNX Runtime execution provider is not installed. */
export class ProviderUnavailableError extends OnnxEvaluatorError {
  override name = 'ProviderUnavailableError';
  readonly provider: string;
  constructor(provider: string, message: string, opts: OnnxEvaluatorErrorOptions = {}) {
    super(message, opts);
    this.provider = provider;
  }
}
