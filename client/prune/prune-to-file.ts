/** Prunes a delta straight into a `.dppa` file. */
import { stat } from 'node:fs/promises';
import { DeltaFileWriter } from '../../proto/sparse/index.js';
import { openPrune, type PruneOptions, type PruneReport } from './pruner.js';

/** Options of {@link pruneToFile}: those of a prune, and the file to write. */
export interface PruneToFileOptions extends PruneOptions {
  /** Path of the `.dppa` file; it appears only once complete. */
  out: string;
}

/** The prune report, with the file written. */
export interface PruneFileReport extends PruneReport {
  file: string;
  fileBytes: number;
}

/**
 * Prunes `finetuned − base` and writes the partitioned sparse delta to `out`.
 * Nothing is left at `out` if it fails or is aborted.
 * @throws RangeError for bad options, CheckpointMismatchError, FormatError, AbortError.
 */
export async function pruneToFile(opts: PruneToFileOptions): Promise<PruneFileReport> {
  const session = await openPrune(opts);
  try {
    const writer = await DeltaFileWriter.create(opts.out);
    try {
      for await (const record of session.records()) await writer.write(record);
      await writer.close();
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return { ...session.report, file: opts.out, fileBytes: (await stat(opts.out)).size };
  } finally {
    await session.close();
  }
}
