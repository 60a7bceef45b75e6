/**
 * A checkpoint written by several processes at once: one lays the output out, any writes tensors at their offsets,
 * one renames it into place; the caller tracks which tensors are written. See docs/design/safetensors.md.
 */

import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { FormatError } from '../errors.js';
import { copyExtraFiles, exists, syncPath, writeAllAt } from './fs-util.js';
import { type CheckpointLayout, INDEX_FILE_NAME } from './layout.js';
import {
  createLayoutFiles,
  planLayoutFiles,
  publishFolder,
  shardIndexJson,
  syncFiles,
  type TensorSlot,
} from './writer.js';

/** Options of {@link SharedCheckpointWriter.layOut}. */
export interface LayOutOptions {
  /** A checkpoint folder (or a file in it) whose non-weight files are copied into the output. @default none */
  copyExtraFilesFrom?: string;
}

/** Positional writes into a laid-out temporary checkpoint folder, from any process. */
export class SharedCheckpointWriter {
  private readonly handles = new Map<string, Promise<FileHandle>>();

  private constructor(
    /** Absolute temporary folder holding the layout. */
    readonly tmpDir: string,
    /** Absolute destination folder. */
    readonly outDir: string,
    private readonly slots: ReadonlyMap<string, TensorSlot>,
  ) {}

  /**
   * Lays out the temporary folder `tmpDir` for `layout` unless it already
   * exists: builds it under another name and renames it to `tmpDir` when
   * complete, so that `tmpDir` existing means the layout is whole. Safe to
   * call again after a crash at any point.
   * @throws FormatError / UnsupportedDtypeError if the layout is invalid.
   */
  static async layOut(
    tmpDir: string,
    outDir: string,
    layout: CheckpointLayout,
    opts: LayOutOptions = {},
  ): Promise<void> {
    const tmp = resolve(tmpDir);
    const { files, slots } = planLayoutFiles(resolve(outDir), layout);
    if (await exists(tmp)) return;
    await mkdir(dirname(tmp), { recursive: true });
    const building = `${tmp}.build-${randomBytes(6).toString('hex')}`;
    await mkdir(building);
    try {
      const handles = await createLayoutFiles(building, files);
      await Promise.all([...handles.values()].map((h) => h.close()));
      if (layout.sharded) await writeFile(join(building, INDEX_FILE_NAME), shardIndexJson(layout, slots));
      if (opts.copyExtraFilesFrom !== undefined) await copyExtraFiles(opts.copyExtraFilesFrom, building);
      await syncFiles(building);
      await rename(building, tmp);
      await syncPath(dirname(tmp));
    } catch (err) {
      await rm(building, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Opens a folder laid out by {@link layOut} for writing tensors.
   * @throws Error with code ENOENT if `tmpDir` does not exist (not laid out yet, or already committed).
   */
  static async open(tmpDir: string, outDir: string, layout: CheckpointLayout): Promise<SharedCheckpointWriter> {
    const tmp = resolve(tmpDir);
    const { slots } = planLayoutFiles(resolve(outDir), layout);
    if (!(await exists(tmp)))
      throw Object.assign(new Error(`${tmp} does not exist (not laid out, or already committed)`), { code: 'ENOENT' });
    return new SharedCheckpointWriter(tmp, resolve(outDir), slots);
  }

  /** The byte range of a tensor. @throws FormatError if the layout has no such tensor. */
  slot(name: string): TensorSlot {
    const s = this.slots.get(name);
    if (s === undefined) throw new FormatError('tensor is not in the layout', { file: this.outDir, tensor: name });
    return s;
  }

  /**
   * Writes one tensor's bytes at its offset and flushes them to disk
   * (fdatasync) before resolving.
   * @throws FormatError naming file and tensor if the tensor is not in the layout or `bytes` has the wrong length.
   * @throws Error with code ENOENT if the folder was committed meanwhile.
   */
  async writeTensor(name: string, bytes: Uint8Array): Promise<void> {
    const s = this.slot(name);
    if (bytes.byteLength !== s.byteLength) {
      throw new FormatError(
        `got ${bytes.byteLength} bytes, ${s.dtype} ${JSON.stringify(s.shape)} needs ${s.byteLength}`,
        { file: s.file, tensor: name },
      );
    }
    const fh = await this.handle(s.fileName);
    await writeAllAt(fh, bytes, s.position);
    await fh.datasync();
  }

  private handle(fileName: string): Promise<FileHandle> {
    let h = this.handles.get(fileName);
    if (h === undefined) {
      // 'r+': the file must already exist (laid out); never create one in a folder that was committed meanwhile.
      h = open(join(this.tmpDir, fileName), 'r+');
      void h.catch(() => this.handles.delete(fileName));
      this.handles.set(fileName, h);
    }
    return h;
  }

  /** Closes the files this writer opened. */
  async close(): Promise<void> {
    const handles = [...this.handles.values()];
    this.handles.clear();
    await Promise.allSettled(handles.map(async (h) => (await h).close()));
  }

  /**
   * Makes the folder durable and renames it to `outDir` (replacing an older
   * one). The caller must know every tensor is written. Idempotent: when
   * `tmpDir` is gone but `outDir` exists, the rename already happened.
   * @throws Error with code ENOENT if neither folder exists.
   */
  static async commit(tmpDir: string, outDir: string): Promise<void> {
    const tmp = resolve(tmpDir);
    const out = resolve(outDir);
    if (!(await exists(tmp))) {
      if (await exists(out)) return;
      throw Object.assign(new Error(`neither ${tmp} nor ${out} exists`), { code: 'ENOENT' });
    }
    await syncFiles(tmp);
    await publishFolder(tmp, out, true);
  }
}
