/**
 * Writes the merged patch file (docs/formats.md, "Merged patch") from the
 * tensors' framed records as the merge kernel hands them over, in any order:
 * the file holds them in the header's order (the base's), so a record block
 * that arrives early waits here for the ones before it. The file appears under
 * its name only when complete and synced, and is hashed as it is written.
 */
import { createHash, randomBytes } from 'node:crypto';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { syncFolder } from '../../proto/fs-sync.js';
import { DeltaRecord, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { DELTA_FILE_MAGIC, RECORD_LENGTH_BYTES } from '../../proto/sparse/delta-format.js';
import type { MergedFileInfo } from '../jobs/job-store.js';

/** The merged patch being written. */
export class PatchWriter {
  private readonly hash = createHash('sha256');
  private size = 0;
  private next = 0;
  /** Tensors handed over before their turn, with their callers' waits. */
  private readonly early = new Map<string, { records: readonly Uint8Array[]; resolve: (written: Promise<void>) => void; reject: (err: Error) => void }>();
  /** Serialises writes; `failure` keeps the first error. */
  private writing: Promise<void> = Promise.resolve();
  private failure: Error | undefined;
  private cancelled: Error | undefined;
  private readonly order: readonly string[];

  private constructor(
    private readonly path: string,
    private readonly tmp: string,
    private fh: FileHandle | undefined,
    header: DeltaHeader,
  ) {
    this.order = header.tensors.map((t) => t.name);
    const encoded = DeltaRecord.encode({ header }).finish();
    const length = Buffer.alloc(RECORD_LENGTH_BYTES);
    length.writeUInt32LE(encoded.length);
    this.append(DELTA_FILE_MAGIC, length, encoded);
  }

  /**
   * Starts the patch at `path` (written to a temporary name beside it).
   * @param header - From `patchHeader`: the tensors, in the order their records must follow.
   */
  static async create(path: string, header: DeltaHeader): Promise<PatchWriter> {
    const tmp = `${path}.tmp-${randomBytes(6).toString('hex')}`;
    return new PatchWriter(path, tmp, await open(tmp, 'wx'), header);
  }

  /**
   * Hands over a tensor's framed records (`patchTensorRecords`). Resolves once
   * they are written, after every tensor before it in the header: a caller
   * ahead of its turn waits, so that records held here stay bounded by the
   * callers (the merge's lanes). Call {@link cancel} when a tensor will never come.
   */
  add(tensor: string, records: readonly Uint8Array[]): Promise<void> {
    if (this.cancelled !== undefined) return Promise.reject(this.cancelled);
    return new Promise((resolve, reject) => {
      this.early.set(tensor, { records, resolve, reject });
      for (let e; (e = this.early.get(this.order[this.next] ?? '')) !== undefined; this.next++) {
        this.early.delete(this.order[this.next]!);
        this.append(...e.records);
        e.resolve(this.writing);
      }
    });
  }

  /** Fails every waiting and later {@link add}: a tensor of the header will never be handed over. */
  cancel(err: Error): void {
    this.cancelled ??= err;
    for (const e of this.early.values()) e.reject(err);
    this.early.clear();
  }

  /**
   * Ends the file (end marker, fsync, rename, folder fsync).
   * @returns Its name, size and SHA-256.
   * @throws Error if a tensor of the header is missing, or from the file system; the file is then removed.
   */
  async close(): Promise<MergedFileInfo> {
    if (this.next < this.order.length) throw new Error(`merged patch: tensor "${this.order[this.next]}" was never handed over`);
    this.append(new Uint8Array(RECORD_LENGTH_BYTES));
    await this.writing;
    if (this.failure !== undefined) throw this.failure;
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
    await this.writing;
    await fh.close().catch(() => undefined);
    await rm(this.tmp, { force: true });
  }

  private append(...parts: Uint8Array[]): void {
    for (const p of parts) {
      this.hash.update(p);
      this.size += p.length;
    }
    this.writing = this.writing.then(async () => {
      if (this.failure !== undefined || this.fh === undefined) return;
      try {
        for (const p of parts) for (let done = 0; done < p.length; ) done += (await this.fh.write(p, done)).bytesWritten;
      } catch (err) {
        this.failure = err instanceof Error ? err : new Error(String(err));
      }
    });
  }
}
