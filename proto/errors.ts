/**
 * Typed errors raised while reading or writing the formats both sides speak, each naming the file and tensor.
 * See docs/design/errors.md.
 */

/** Where in the input a format error was found. */
export interface FormatErrorOptions extends ErrorOptions {
  /** The file being read or written, if any. */
  file?: string | undefined;
  /** The tensor concerned, if any. */
  tensor?: string | undefined;
}

function locate(message: string, opts: FormatErrorOptions): string {
  const where: string[] = [];
  if (opts.file !== undefined) where.push(opts.file);
  if (opts.tensor !== undefined) where.push(`tensor "${opts.tensor}"`);
  return where.length > 0 ? `${where.join(', ')}: ${message}` : message;
}

/** The input does not follow the format: bad header, bad offsets, wrong length, bad record. */
export class FormatError extends Error {
  override name = 'FormatError';
  readonly file: string | undefined;
  readonly tensor: string | undefined;
  constructor(message: string, opts: FormatErrorOptions = {}) {
    super(locate(message, opts), { cause: opts.cause });
    this.file = opts.file;
    this.tensor = opts.tensor;
  }
}

/** A tensor is stored in a dtype this project does not handle (only F32, F16 and BF16 are). */
export class UnsupportedDtypeError extends FormatError {
  override name = 'UnsupportedDtypeError';
  readonly dtype: string;
  constructor(dtype: string, opts: FormatErrorOptions = {}) {
    super(`dtype ${dtype} is not supported (expected F32, F16 or BF16)`, opts);
    this.dtype = dtype;
  }
}

/** A checksum did not match: the bytes were damaged in transit or on disk. */
export class ChecksumError extends FormatError {
  override name = 'ChecksumError';
}

/** The input ended before a complete record was read. */
export class TruncatedError extends FormatError {
  override name = 'TruncatedError';
}

/**
 * A fine-tuned weight minus its base weight is not a finite fp32 number: the base holds a non-finite weight, or the
 * difference overflows fp32. Not a damaged file: the same base and upload fail alike on every attempt.
 */
export class BaseDeltaError extends FormatError {
  override name = 'BaseDeltaError';
}

/** The message of anything thrown: an Error's message, else its text. */
export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
