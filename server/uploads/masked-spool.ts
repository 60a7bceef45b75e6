/**
 * The masked vectors of a secure job: one file of little-endian uint32 words per party
 * (`<job>/secure/masked/<party>.u32`), written chunk by chunk after each chunk's CRC-32C is checked; its whole words
 * are what a resuming party is told (a torn last word is cut off before the next write). The spool of a secure job holds these words and the supports, never a value.
 * Beside a vector, `<party>.clipped`: the clipped count the party reported, written before the last words.
 * Once the job's secure data is discarded (`secure/discarded` written first), no word is written any more.
 */
import { constants } from 'node:fs';
import { mkdir, open, readFile, rm, rmdir, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { ChecksumError } from '../../proto/errors.js';
import { sizeOf } from '../../proto/safetensors/fs-util.js';
import { crc32c } from '../../proto/sparse/index.js';
import { MaskedLengthError } from '../../proto/secure/index.js';
import { writeFileDurably } from '../durable-write.js';
import { FailedPreconditionError, InvalidArgumentError } from '../errors.js';

/** Folder of a job's secure files. */
export function secureDir(jobDir: string): string {
  return join(jobDir, 'secure');
}

/** The masked-vector file of a party. */
export function maskedFile(jobDir: string, party: string): string {
  return join(secureDir(jobDir), 'masked', `${party}.u32`);
}

/** The clipped count reported with a party's whole masked vector. */
function clippedFile(jobDir: string, party: string): string {
  return join(secureDir(jobDir), 'masked', `${party}.clipped`);
}

/**
 * Values the party reported clipped with the chunk that completed its masked vector (0 when none was kept): the
 * count survives a resumed upload and a restart, whichever path records the vector.
 */
export async function maskedClipped(jobDir: string, party: string): Promise<number> {
  const file = clippedFile(jobDir, party);
  let text: string;
  try {
    text = (await readFile(file, 'utf8')).trim();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n))
    throw new Error(`${file}: not a clipped count (${JSON.stringify(text.slice(0, 40))}); the file is corrupt`);
  return n;
}

/** The mark a job's discard leaves before it deletes the masked vectors (server/secure/secure-sum.ts). */
export function discardedMark(jobDir: string): string {
  return join(secureDir(jobDir), 'discarded');
}

/** True once the job's secure data was discarded (it ended): nothing of it is written again. */
export async function secureDataDiscarded(jobDir: string): Promise<boolean> {
  return (await sizeOf(discardedMark(jobDir))) !== undefined;
}

/** Refused: the job ended and its masked vectors were deleted (FAILED_PRECONDITION). */
export class SecureDataDiscardedError extends FailedPreconditionError {}

async function refuseIfDiscarded(jobDir: string, party: string): Promise<void> {
  if (await secureDataDiscarded(jobDir))
    throw new SecureDataDiscardedError(
      `party ${party}: the job ended and its masked vectors were deleted: no masked upload is taken`,
    );
}

/**
 * A masked upload that met the discard while it opened its file: the file it may have made is removed, and the
 * `masked/` folder if that leaves it empty (the discard deleted it before), then the refusal is thrown.
 */
async function leaveDiscarded(jobDir: string, party: string, made: boolean): Promise<never> {
  if (made) await rm(maskedFile(jobDir, party), { force: true });
  await rmdir(join(secureDir(jobDir), 'masked')).catch(() => undefined);
  throw new SecureDataDiscardedError(
    `party ${party}: the job ended and its masked vectors were deleted: no masked upload is taken`,
  );
}

/** Words of a party's masked vector held (0 when none). */
export async function maskedWordsHeld(jobDir: string, party: string): Promise<number> {
  return Math.floor(((await sizeOf(maskedFile(jobDir, party))) ?? 0) / 4);
}

/** One received chunk of a masked vector. */
export interface MaskedPiece {
  offset: bigint;
  words: Uint8Array;
  crc32c: number;
  totalWords: bigint;
  /** Values the party clipped over the whole vector (on the chunk that ends it). */
  clipped?: bigint;
}

/**
 * Appends chunks to a party's masked vector, each checked before it is written: the vector's declared length is
 * |U|, the chunk starts at the words held, its CRC matches and it ends within |U|.
 * @returns The words held afterwards.
 * Checked before the file is opened, after, and before each write: a job whose secure data was discarded (it
 * ended) gets no word, even from a stream that started before (a file it created is removed; one the discard
 * deleted while open takes the writes into the deleted file, freed at close).
 * @throws MaskedLengthError (INVALID_ARGUMENT) for a vector of another length; FailedPreconditionError for an
 *   offset other than the words held; ChecksumError (DATA_LOSS); InvalidArgumentError for bytes not whole words
 *   or a clipped count above |U|;
 *   SecureDataDiscardedError (FAILED_PRECONDITION) once the job's secure data was discarded.
 */
export async function appendMasked(
  jobDir: string,
  party: string,
  unionSize: number,
  pieces: AsyncIterable<MaskedPiece>,
  onBytes: (n: number) => void,
): Promise<number> {
  const file = maskedFile(jobDir, party);
  await refuseIfDiscarded(jobDir, party);
  await mkdir(join(secureDir(jobDir), 'masked'), { recursive: true });
  // Not 'a': an append ignores the position, so a torn write (short write, ENOSPC) would shift every later word.
  let fh: FileHandle;
  try {
    fh = await open(file, constants.O_RDWR | constants.O_CREAT, 0o600);
  } catch (err) {
    // The discard may have deleted the folder between the mkdir and the open.
    if (await secureDataDiscarded(jobDir)) return leaveDiscarded(jobDir, party, false);
    throw err;
  }
  let held: number;
  try {
    // The discard may have run between the check and the open (which then made the file again).
    if (await secureDataDiscarded(jobDir)) return await leaveDiscarded(jobDir, party, true);
    held = Math.floor((await fh.stat()).size / 4);
    await fh.truncate(held * 4);
    for await (const p of pieces) {
      if (p.totalWords !== BigInt(unionSize))
        throw new MaskedLengthError(`MaskedChunk total_words: ${p.totalWords}, the union has ${unionSize} positions`);
      if (p.offset !== BigInt(held))
        throw new FailedPreconditionError(
          `MaskedChunk offset: ${p.offset}, the server holds ${held} words: resume there`,
        );
      if (p.words.length % 4 !== 0)
        throw new InvalidArgumentError(`MaskedChunk words: ${p.words.length} bytes, not whole 4-byte words`);
      const crc = crc32c(p.words);
      if (crc !== p.crc32c)
        throw new ChecksumError(
          `MaskedChunk at word ${p.offset}: CRC-32C mismatch (sent ${p.crc32c}, computed ${crc})`,
        );
      // One value per word: a party cannot have clipped more than |U| values.
      if (p.clipped !== undefined && p.clipped > BigInt(unionSize))
        throw new InvalidArgumentError(
          `MaskedChunk clipped: ${p.clipped} values, more than the union's ${unionSize} positions`,
        );
      const n = p.words.length / 4;
      if (held + n > unionSize)
        throw new MaskedLengthError(`MaskedChunk at word ${p.offset}: ${n} words run past the union's ${unionSize}`);
      await refuseIfDiscarded(jobDir, party);
      // The count first: once the file is whole, its count is beside it (a crash before the record keeps both).
      if (n > 0 && held + n === unionSize) await writeFileDurably(clippedFile(jobDir, party), String(p.clipped ?? 0n));
      await writeAt(fh, p.words, held * 4);
      held += n;
      onBytes(p.words.length);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
  return held;
}

/** Writes all of `bytes` at `position`, however many writes it takes. */
async function writeAt(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  for (let done = 0; done < bytes.length;) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.length - done, position + done);
    if (bytesWritten <= 0) throw new Error(`masked vector: no bytes written at byte ${position + done}`);
    done += bytesWritten;
  }
}

/** Reads words [start, start + count) of a party's masked vector. */
export async function readMasked(jobDir: string, party: string, start: number, count: number): Promise<Uint32Array> {
  const out = new Uint32Array(count);
  const fh = await open(maskedFile(jobDir, party), 'r');
  try {
    const bytes = new Uint8Array(out.buffer);
    const { bytesRead } = await fh.read(bytes, 0, bytes.length, start * 4);
    if (bytesRead !== bytes.length)
      throw new Error(`${maskedFile(jobDir, party)}: ${bytesRead} bytes at word ${start}, expected ${bytes.length}`);
  } finally {
    await fh.close();
  }
  // Little-endian words (every platform Node runs on).
  return out;
}
