/**
 * Writing safetensors checkpoints atomically: tensors in any order into a temporary sibling folder, renamed into
 * place once complete and fsynced. See docs/design/safetensors.md.
 */

import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { FormatError } from '../errors.js';
import { encodeFromF32 } from './dtype.js';
import { copyExtraFiles, exists, syncPath, writeAllAt } from './fs-util.js';
import { buildHeader } from './header.js';
import { type CheckpointLayout, INDEX_FILE_NAME, type LayoutTensor, validateLayout } from './layout.js';

/** Options of {@link CheckpointWriter.create}. */
export interface CreateWriterOptions {
  /**
   * A checkpoint folder (or a file in it) whose non-weight files
   * (config.json, tokenizer files, …) are copied into the output.
   * Weight files of any format and shard indexes are skipped.
   */
  copyExtraFilesFrom?: string;
  /** Replace `outDir` if it exists. @default false */
  overwrite?: boolean;
}

/** Where one tensor of a layout lands: its weight file and byte range. */
export interface TensorSlot extends LayoutTensor {
  /** Bare name of its weight file, e.g. `model.safetensors`. */
  fileName: string;
  /** Final path of its weight file, for messages. */
  file: string;
  /** Absolute byte offset of its first data byte in the file. */
  position: number;
  byteLength: number;
  numel: number;
}

/** One weight file of a layout as planned: its header bytes and its full size. */
export interface PlannedFile {
  fileName: string;
  header: Uint8Array;
  /** Header plus data bytes. */
  size: number;
}

/**
 * Plans a layout's weight files: each file's header and size, and each
 * tensor's byte range, before any data exists.
 * @param outDir Absolute destination folder (names files in messages).
 * @throws FormatError / UnsupportedDtypeError if the layout is invalid.
 */
export function planLayoutFiles(
  outDir: string,
  layout: CheckpointLayout,
): { files: PlannedFile[]; slots: Map<string, TensorSlot> } {
  validateLayout(layout, outDir);
  const files: PlannedFile[] = [];
  const slots = new Map<string, TensorSlot>();
  for (const f of layout.files) {
    const file = join(outDir, f.fileName);
    const header = buildHeader(file, f.metadata, f.tensors);
    files.push({ fileName: f.fileName, header: header.bytes, size: header.bytes.byteLength + header.dataSize });
    f.tensors.forEach((t, i) => {
      const byteLength = (i + 1 < f.tensors.length ? header.offsets[i + 1]! : header.dataSize) - header.offsets[i]!;
      const numel = t.shape.reduce((a, b) => a * b, 1);
      slots.set(t.name, {
        ...t,
        fileName: f.fileName,
        file,
        position: header.bytes.byteLength + header.offsets[i]!,
        byteLength,
        numel,
      });
    });
  }
  return { files, slots };
}

/**
 * Creates a layout's weight files in `dir`: each with its header written and
 * its size set, so that tensors can land anywhere in any order.
 * @returns The open files, by file name; the caller closes them.
 */
export async function createLayoutFiles(dir: string, files: readonly PlannedFile[]): Promise<Map<string, FileHandle>> {
  const handles = new Map<string, FileHandle>();
  try {
    for (const f of files) {
      const fh = await open(join(dir, f.fileName), 'wx');
      handles.set(f.fileName, fh);
      await writeAllAt(fh, f.header, 0);
      await fh.truncate(f.size);
    }
  } catch (err) {
    await Promise.allSettled([...handles.values()].map((h) => h.close()));
    throw err;
  }
  return handles;
}

/** The shard index of a sharded layout (`metadata.total_size` set from the slots). */
export function shardIndexJson(layout: CheckpointLayout, slots: ReadonlyMap<string, TensorSlot>): string {
  const weightMap = layout.files
    .flatMap((f) => f.tensors.map((t): [string, string] => [t.name, f.fileName]))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  let totalSize = 0;
  for (const p of slots.values()) totalSize += p.byteLength;
  const metadata = { ...layout.indexMetadata, total_size: totalSize };
  // fromEntries defines own properties, so a tensor named "__proto__" survives.
  return `${JSON.stringify({ metadata, weight_map: Object.fromEntries(weightMap) }, null, 2)}\n`;
}

/** fsyncs every file of a flat folder, then the folder. */
export async function syncFiles(dir: string): Promise<void> {
  for (const name of await readdir(dir)) await syncPath(join(dir, name));
  await syncPath(dir);
}

/**
 * Renames a finished temporary folder to `outDir`, moving an old one aside
 * first when `overwrite` is set; `outDir` is never partial.
 * @throws Error with code EEXIST if `outDir` exists and `overwrite` is not set.
 */
export async function publishFolder(tmpDir: string, outDir: string, overwrite: boolean): Promise<void> {
  const parent = dirname(outDir);
  if (!(await exists(outDir))) {
    await rename(tmpDir, outDir);
    await syncPath(parent);
    return;
  }
  if (!overwrite) throw alreadyExists(outDir);
  // No portable atomic directory swap exists; this leaves outDir missing
  // (never partial) for the instant between the two renames.
  const old = `${outDir}.old-${randomBytes(6).toString('hex')}`;
  await rename(outDir, old);
  try {
    await rename(tmpDir, outDir);
  } catch (err) {
    await rename(old, outDir);
    throw err;
  }
  await syncPath(parent);
  await rm(old, { recursive: true, force: true });
}

interface Planned extends TensorSlot {
  fh: FileHandle;
}

function alreadyExists(path: string): Error {
  return Object.assign(new Error(`${path} already exists (pass overwrite: true to replace it)`), { code: 'EEXIST' });
}

/**
 * Writes a checkpoint whose files, tensor order and metadata follow a
 * {@link CheckpointLayout}. Write every tensor once, then
 * {@link CheckpointWriter.commit}; or {@link CheckpointWriter.abort}.
 */
export class CheckpointWriter {
  private readonly written = new Set<string>();
  private readonly inflight = new Set<Promise<void>>();
  /** Tensors not yet written, per weight file. */
  private readonly unwritten = new Map<FileHandle, number>();
  /** fsyncs of the weight files whose every tensor is written, started at once so that the disk works while the rest is computed. */
  private readonly syncs: Promise<void>[] = [];
  private state: 'open' | 'committing' | 'done' = 'open';

  private constructor(
    /** Absolute destination folder. */
    readonly outDir: string,
    /** Absolute temporary folder being written, `${outDir}.tmp-<random>`. */
    readonly tmpDir: string,
    /** The layout being written. */
    readonly layout: CheckpointLayout,
    private readonly overwrite: boolean,
    private readonly planned: Map<string, Planned>,
    private readonly handles: FileHandle[],
  ) {
    for (const p of planned.values()) this.unwritten.set(p.fh, (this.unwritten.get(p.fh) ?? 0) + 1);
  }

  /**
   * Validates the layout, creates the temporary folder with every weight
   * file's header in place and its size set, and copies the extra files.
   * @param outDir Destination folder; its parent is created if missing.
   * @param layout Files, tensor order, metadata (e.g. `Checkpoint.layout` of the base).
   * @param opts See {@link CreateWriterOptions}.
   * @throws Error with code EEXIST if `outDir` exists and `overwrite` is not set.
   * @throws FormatError / UnsupportedDtypeError if the layout is invalid.
   */
  static async create(
    outDir: string,
    layout: CheckpointLayout,
    opts: CreateWriterOptions = {},
  ): Promise<CheckpointWriter> {
    const out = resolve(outDir);
    const { files, slots } = planLayoutFiles(out, layout);
    if (opts.overwrite !== true && (await exists(out))) throw alreadyExists(out);
    await mkdir(dirname(out), { recursive: true });
    const tmp = `${out}.tmp-${randomBytes(6).toString('hex')}`;
    await mkdir(tmp);
    const planned = new Map<string, Planned>();
    let handles = new Map<string, FileHandle>();
    try {
      handles = await createLayoutFiles(tmp, files);
      for (const [name, slot] of slots) planned.set(name, { ...slot, fh: handles.get(slot.fileName)! });
      if (opts.copyExtraFilesFrom !== undefined) await copyExtraFiles(opts.copyExtraFilesFrom, tmp);
    } catch (err) {
      await Promise.allSettled([...handles.values()].map((h) => h.close()));
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
    return new CheckpointWriter(out, tmp, layout, opts.overwrite === true, planned, [...handles.values()]);
  }

  private plan(name: string): Planned {
    if (this.state !== 'open') throw new Error(`checkpoint writer for ${this.outDir} is already committed or aborted`);
    const p = this.planned.get(name);
    if (p === undefined) throw new FormatError(`tensor is not in the layout`, { file: this.outDir, tensor: name });
    return p;
  }

  /**
   * Writes one tensor's bytes (little-endian, in the layout's dtype).
   * @throws FormatError naming file and tensor if the tensor is not in the
   *   layout, was already written, or `bytes` has the wrong length.
   */
  async writeTensor(name: string, bytes: Uint8Array): Promise<void> {
    const p = this.plan(name);
    const where = { file: p.file, tensor: name };
    if (this.written.has(name)) throw new FormatError(`tensor written twice`, where);
    if (bytes.byteLength !== p.byteLength) {
      throw new FormatError(
        `got ${bytes.byteLength} bytes, ${p.dtype} ${JSON.stringify(p.shape)} needs ${p.byteLength}`,
        where,
      );
    }
    // Claimed before the await so a concurrent second write is refused.
    this.written.add(name);
    const write = writeAllAt(p.fh, bytes, p.position);
    this.inflight.add(write);
    try {
      await write;
    } catch (err) {
      this.written.delete(name);
      throw err;
    } finally {
      this.inflight.delete(write);
    }
    const left = this.unwritten.get(p.fh)! - 1;
    this.unwritten.set(p.fh, left);
    if (left === 0) {
      const sync = p.fh.sync();
      // Awaited by commit(); until then a failure must not surface as an unhandled rejection.
      sync.catch(() => undefined);
      this.syncs.push(sync);
    }
  }

  /**
   * Writes one tensor from F32 values, converted to the layout's dtype
   * (round to nearest, ties to even).
   * @throws FormatError as {@link CheckpointWriter.writeTensor}, or if the element count is wrong.
   */
  async writeTensorF32(name: string, values: Float32Array): Promise<void> {
    const p = this.plan(name);
    if (values.length !== p.numel) {
      throw new FormatError(`got ${values.length} values, shape ${JSON.stringify(p.shape)} needs ${p.numel}`, {
        file: p.file,
        tensor: name,
      });
    }
    await this.writeTensor(name, encodeFromF32(values, p.dtype));
  }

  /**
   * Checks every tensor was written, writes the shard index (sharded
   * layouts, with `metadata.total_size` updated), fsyncs everything and
   * renames the temporary folder to `outDir`. On any failure the temporary
   * folder is removed and `outDir` is left as it was.
   * @throws FormatError naming the first missing tensor if any was not written.
   * @throws Error with code EEXIST if `outDir` appeared meanwhile and `overwrite` is not set.
   */
  async commit(): Promise<void> {
    if (this.state !== 'open') throw new Error(`checkpoint writer for ${this.outDir} is already committed or aborted`);
    this.state = 'committing';
    try {
      await Promise.allSettled([...this.inflight]);
      const missing = [...this.planned.values()].filter((p) => !this.written.has(p.name));
      if (missing.length > 0) {
        const names = missing
          .slice(0, 5)
          .map((p) => p.name)
          .join(', ');
        throw new FormatError(
          `${missing.length} tensor(s) never written (${names}${missing.length > 5 ? ', …' : ''})`,
          {
            file: missing[0]!.file,
            tensor: missing[0]!.name,
          },
        );
      }
      if (this.layout.sharded)
        await writeFile(join(this.tmpDir, INDEX_FILE_NAME), shardIndexJson(this.layout, this.planned));
      await Promise.all(this.syncs);
      await Promise.all(this.handles.map((h) => h.sync()));
      await this.closeHandles();
      await syncFiles(this.tmpDir);
      await publishFolder(this.tmpDir, this.outDir, this.overwrite);
      this.state = 'done';
    } catch (err) {
      await this.discard();
      throw err;
    }
  }

  private async closeHandles(): Promise<void> {
    const handles = this.handles.splice(0);
    await Promise.allSettled(handles.map((h) => h.close()));
  }

  private async discard(): Promise<void> {
    this.state = 'done';
    await Promise.allSettled([...this.inflight, ...this.syncs]);
    await this.closeHandles();
    await rm(this.tmpDir, { recursive: true, force: true });
  }

  /**
   * Abandons the checkpoint: closes files and removes the temporary folder.
   * Does nothing if already committed or aborted, so it is safe in `finally`.
   */
  async abort(): Promise<void> {
    if (this.state !== 'open') return;
    await this.discard();
  }
}
