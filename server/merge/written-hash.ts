/**
 * SHA-256 of a dense merge's weight files, hashed from disk in file order while the merge runs: each tensor once
 * written and flushed, so that the commit no longer reads the whole output back after the last tensor.
 */
import { createHash, type Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { CheckpointLayout } from '../../proto/safetensors/index.js';
import { planLayoutFiles } from '../../proto/safetensors/writer.js';
import type { MergedFileInfo } from '../jobs/job-store.js';

/** Read size, as output-files.ts hashes. */
const READ_BYTES = 1024 * 1024;

interface HashedFile {
  fileName: string;
  size: number;
  hash: Hash;
  /** Its tensors in data order. */
  tensors: { name: string; end: number }[];
  /** Tensors hashed (a prefix of `tensors`) and bytes hashed (from the file's start). */
  next: number;
  hashed: number;
  handle: Promise<FileHandle> | undefined;
}

/**
 * Hashes the weight files of a folder laid out by SharedCheckpointWriter as their tensors are reported written.
 * The bytes are read back from the file (from the page cache, in the background), never taken from the caller.
 * Only a file every tensor of which was reported on this replica gets a digest: a tensor another replica wrote (on
 * shared storage) may still read as the zeros this host cached before it was written, so such a file is left to be
 * hashed again through a fresh handle. A tensor written again (by another replica, or this one after a retry) holds
 * the same bytes, as the merge is deterministic, so a digest taken after its first report stays right.
 */
export class WrittenFilesHash {
  private readonly files: HashedFile[] = [];
  private readonly fileOf = new Map<string, HashedFile>();
  private readonly done = new Set<string>();
  private drain: Promise<void> = Promise.resolve();
  private failed = false;
  private readonly buf = Buffer.allocUnsafeSlow(READ_BYTES);

  /** @param tmpDir - The laid-out folder the tensors are written to. */
  constructor(
    private readonly tmpDir: string,
    outDir: string,
    layout: CheckpointLayout,
  ) {
    const { files, slots } = planLayoutFiles(outDir, layout);
    for (const f of files) {
      const file: HashedFile = {
        fileName: f.fileName,
        size: f.size,
        hash: createHash('sha256'),
        tensors: [],
        next: 0,
        hashed: 0,
        handle: undefined,
      };
      this.files.push(file);
    }
    const byName = new Map(this.files.map((f) => [f.fileName, f]));
    for (const s of [...slots.values()].sort((a, b) => a.position - b.position)) {
      const file = byName.get(s.fileName)!;
      file.tensors.push({ name: s.name, end: s.position + s.byteLength });
      this.fileOf.set(s.name, file);
    }
  }

  /** Reports a tensor's bytes final on disk (written and flushed); hashes what now follows in order, later. */
  written(name: string): void {
    const file = this.fileOf.get(name);
    if (file === undefined || this.done.has(name)) return;
    this.done.add(name);
    this.advance(file);
  }

  /**
   * Waits for the reads of reported tensors and closes the files.
   * @returns Size and SHA-256 of each weight file all tensors of which were reported, by name (the others are left
   * out, to be hashed again), or undefined if some read failed (hash them all again).
   */
  async finish(): Promise<Map<string, MergedFileInfo> | undefined> {
    await this.close();
    if (this.failed) return undefined;
    const whole = this.files.filter((f) => f.next === f.tensors.length && f.hashed === f.size);
    return new Map(whole.map((f) => [f.fileName, { path: f.fileName, size: f.size, sha256: f.hash.digest('hex') }]));
  }

  /** Stops after the read in progress and closes the files. */
  async close(): Promise<void> {
    await this.drain;
    await Promise.allSettled(this.files.map(async (f) => (await f.handle)?.close()));
    for (const f of this.files) f.handle = undefined;
  }

  private advance(file: HashedFile): void {
    this.drain = this.drain
      .then(async () => {
        if (this.failed) return;
        while (file.next < file.tensors.length && this.done.has(file.tensors[file.next]!.name)) {
          await this.hashTo(file, file.tensors[file.next]!.end);
          file.next++;
        }
        // After the last tensor: whatever the file holds beyond it.
        if (file.next === file.tensors.length) await this.hashTo(file, file.size);
      })
      .catch(() => {
        this.failed = true;
      });
  }

  private async hashTo(file: HashedFile, end: number): Promise<void> {
    if (file.hashed >= end) return;
    file.handle ??= open(join(this.tmpDir, file.fileName), 'r');
    const fh = await file.handle;
    while (file.hashed < end) {
      const want = Math.min(this.buf.length, end - file.hashed);
      const { bytesRead } = await fh.read(this.buf, 0, want, file.hashed);
      if (bytesRead === 0) throw new Error(`${file.fileName} ends at byte ${file.hashed}`);
      file.hash.update(this.buf.subarray(0, bytesRead));
      file.hashed += bytesRead;
    }
  }
}
