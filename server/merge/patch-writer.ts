/**
 * Writes the merged patch file (docs/formats.md, "Merged patch"): its header,
 * then the tensors' framed records in the header's order (the base's), then
 * the end marker. The file appears under its name only when complete and
 * synced, and is hashed as it is written.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { syncFolder } from '../../proto/fs-sync.js';
import { DeltaRecord, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { DELTA_FILE_MAGIC, RECORD_LENGTH_BYTES } from '../../proto/sparse/delta-format.js';
import type { MergedFileInfo } from '../jobs/job-store.js';

/**
 * Bytes read at a time when a piece is joined: 4 MiB blocks take about 40% less CPU than the stream's 64 KiB
 * (docs/performance.md, "Merged patch").
 */
export const JOIN_BLOCK_BYTES = 4 * 1024 * 1024;

/** The merged patch being written, front to back. */
export class PatchWriter {
  private readonly hash = createHash('sha256');
  private size = 0;

  private constructor(
    private readonly path: string,
    private readonly tmp: string,
    private fh: FileHandle | undefined,
  ) {}

  /**
   * Starts the patch at `path` (written to a temporary name beside it) with its header.
   * @param header - From `patchHeader`: the tensors, in the order their records must follow.
   */
  static async create(path: string, header: DeltaHeader): Promise<PatchWriter> {
    const tmp = `${path}.tmp-${randomBytes(6).toString('hex')}`;
    const writer = new PatchWriter(path, tmp, await open(tmp, 'wx'));
    try {
      const encoded = DeltaRecord.encode({ header }).finish();
      const length = Buffer.alloc(RECORD_LENGTH_BYTES);
      length.writeUInt32LE(encoded.length);
      await writer.append(DELTA_FILE_MAGIC, length, encoded);
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return writer;
  }

  /** Appends framed records (`patchTensorRecords`) of the next tensor of the header. */
  async append(...parts: Uint8Array[]): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) throw new Error('merged patch: the writer is closed');
    for (const p of parts) {
      this.hash.update(p);
      this.size += p.length;
      for (let done = 0; done < p.length;) done += (await fh.write(p, done)).bytesWritten;
    }
  }

  /**
   * Appends a file of framed records as it is (a tensor's records written apart), streamed, from byte `start`,
   * `blockBytes` at a time (a parameter for test/bench/patch-join.ts).
   */
  async appendFile(file: string, start = 0, blockBytes = JOIN_BLOCK_BYTES): Promise<void> {
    for await (const block of createReadStream(file, { start, highWaterMark: blockBytes }))
      await this.append(block as Buffer);
  }

  /**
   * Ends the file (end marker, fsync, rename, folder fsync).
   * @returns Its name, size and SHA-256.
   */
  async close(): Promise<MergedFileInfo> {
    await this.append(new Uint8Array(RECORD_LENGTH_BYTES));
    const fh = this.fh!;
    this.fh = undefined;
    await fh.sync();
    await fh.close();
    await rename(this.tmp, this.path);
    await syncFolder(dirname(this.path));
    return { path: basename(this.path), size: this.size, sha256: this.hash.digest('hex') };
  }

  /** Removes the temporary file; does nothing after {@link close}. */
  async abort(): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) return;
    this.fh = undefined;
    await fh.close().catch(() => undefined);
    await rm(this.tmp, { force: true });
  }
}
