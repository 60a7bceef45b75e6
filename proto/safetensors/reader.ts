/**
 * Reading safetensors checkpoints, one tensor at a time, by offset; opening reads only the headers.
 * See docs/design/safetensors.md.
 */

import { open, stat, type FileHandle } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { FormatError } from '../errors.js';
import { bytesPerElement, decodeToF32 } from './dtype.js';
import { DEFAULT_MAX_HEADER_BYTES, type ParsedHeader, readHeader } from './header.js';
import type { CheckpointLayout, TensorInfo } from './layout.js';
import { locateCheckpoint } from './locate.js';
import { ORDERED_LOOKAHEAD, readChunks, readInto } from './read-into.js';
import { readShardIndex, type ShardIndex } from './shard-index.js';

/** Options of {@link Checkpoint.open}. */
export interface OpenCheckpointOptions {
  /** Largest JSON header (and shard index) accepted, in bytes. @default 100 MiB */
  maxHeaderBytes?: number;
}

/** Options of the read methods of {@link Checkpoint}. */
export interface ReadOptions {
  /** Aborts the read between chunks; the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** Options of {@link Checkpoint.readF32} and {@link Checkpoint.readRangeF32}. */
export interface ReadF32Options extends ReadOptions {
  /**
   * Write the values here instead of a new array, and return
   * `into.subarray(0, count)`. Reusing one array across tensors avoids
   * faulting in fresh memory for every tensor (measured near 1 ms per MiB on
   * a VM), which dominates readF32 of large tensors.
   * @default a new Float32Array
   */
  into?: Float32Array;
  /**
   * Also given the stored bytes as they are read, before conversion: pieces
   * of the range in any order, each once, valid only during the call (a
   * merge hashes the base tensor on the way, without a second read). A piece
   * comes at most {@link ORDERED_LOOKAHEAD} − 1 MiB-chunks ahead of the first
   * not yet given, so a consumer holding early pieces holds a few MiB at most.
   * @default none
   */
  onRaw?: (chunk: Uint8Array, offset: number) => void;
}

interface Shard extends ParsedHeader {
  file: string;
  fh: FileHandle;
  /** The opened file's device, inode, size and modification time. */
  identity: string;
}

async function openShard(file: string, maxHeaderBytes: number): Promise<Shard> {
  const fh = await open(file, 'r');
  try {
    const { size, dev, ino, mtimeMs } = await fh.stat();
    return {
      file,
      fh,
      identity: `${dev}:${ino}:${size}:${mtimeMs}`,
      ...(await readHeader(fh, file, size, maxHeaderBytes)),
    };
  } catch (err) {
    await fh.close();
    throw err;
  }
}

/** Opens every shard, or none: on any failure the ones that opened are closed. */
async function openShards(files: string[], maxHeaderBytes: number): Promise<Shard[]> {
  const results = await Promise.allSettled(files.map((f) => openShard(f, maxHeaderBytes)));
  const failed = results.find((r) => r.status === 'rejected');
  if (failed === undefined) return results.map((r) => (r as PromiseFulfilledResult<Shard>).value);
  const opened = results.filter((r): r is PromiseFulfilledResult<Shard> => r.status === 'fulfilled');
  await Promise.all(opened.map((r) => r.value.fh.close()));
  throw failed.reason;
}

async function checkShardsExist(dir: string, indexFile: string, index: ShardIndex): Promise<void> {
  for (const name of index.files) {
    try {
      if (!(await stat(join(dir, name))).isFile()) throw new Error('not a regular file');
    } catch (cause) {
      const tensor = [...index.weightMap].find(([, f]) => f === name)?.[0];
      throw new FormatError(`weight_map names shard "${name}", which cannot be opened`, {
        file: indexFile,
        tensor,
        cause,
      });
    }
  }
}

/** Checks that the shards hold exactly the tensors the index assigns them. */
function crossCheck(shards: Shard[], dir: string, indexFile: string, index: ShardIndex): void {
  const seen = new Map<string, string>();
  for (const shard of shards) {
    const fileName = basename(shard.file);
    for (const { name } of shard.tensors) {
      const where = { file: shard.file, tensor: name };
      const other = seen.get(name);
      if (other !== undefined) throw new FormatError(`tensor is also present in shard "${other}"`, where);
      seen.set(name, fileName);
      const expected = index.weightMap.get(name);
      if (expected === undefined) throw new FormatError(`tensor is not listed in ${indexFile}`, where);
      if (expected !== fileName) throw new FormatError(`${indexFile} places this tensor in "${expected}"`, where);
    }
  }
  for (const [name, fileName] of index.weightMap) {
    if (!seen.has(name)) {
      throw new FormatError(`tensor is listed in ${indexFile} but missing from this shard`, {
        file: join(dir, fileName),
        tensor: name,
      });
    }
  }
}

/**
 * An open safetensors checkpoint: one file, or a folder holding
 * `model.safetensors` or a sharded `model.safetensors.index.json`.
 * Call {@link Checkpoint.close} when done.
 */
export class Checkpoint {
  /** The shape of the checkpoint, for a writer to mirror. */
  readonly layout: CheckpointLayout;
  private readonly order: TensorInfo[];
  private readonly byName = new Map<string, { info: TensorInfo; fh: FileHandle }>();
  private closed = false;

  private constructor(
    /** Absolute path the checkpoint was opened from (file or folder). */
    readonly path: string,
    private readonly shards: Shard[],
    sharded: boolean,
    indexMetadata: Record<string, unknown> | undefined,
  ) {
    this.order = shards.flatMap((s) => s.tensors);
    for (const s of shards) for (const info of s.tensors) this.byName.set(info.name, { info, fh: s.fh });
    this.layout = {
      sharded,
      indexMetadata,
      files: shards.map((s) => ({
        fileName: basename(s.file),
        metadata: s.metadata,
        tensors: s.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: [...t.shape] })),
      })),
    };
  }

  /**
   * Opens a checkpoint and validates every header (and the shard index).
   * @param path A `.safetensors` file, or a folder (see {@link locateCheckpoint}).
   * @param opts See {@link OpenCheckpointOptions}.
   * @throws TruncatedError if a file is shorter than its header or data say.
   * @throws UnsupportedDtypeError for a dtype other than F32, F16, BF16.
   * @throws FormatError for any other malformed header, overlapping or
   *   out-of-bounds offsets, or an index that disagrees with its shards.
   */
  static async open(path: string, opts: OpenCheckpointOptions = {}): Promise<Checkpoint> {
    const max = opts.maxHeaderBytes ?? DEFAULT_MAX_HEADER_BYTES;
    const loc = await locateCheckpoint(path);
    if (!loc.sharded) {
      return new Checkpoint(loc.file, await openShards([loc.file], max), false, undefined);
    }
    const index = await readShardIndex(loc.indexFile, max);
    await checkShardsExist(loc.dir, loc.indexFile, index);
    const shards = await openShards(
      index.files.map((f) => join(loc.dir, f)),
      max,
    );
    try {
      crossCheck(shards, loc.dir, loc.indexFile, index);
    } catch (err) {
      await Promise.all(shards.map((s) => s.fh.close()));
      throw err;
    }
    return new Checkpoint(loc.dir, shards, true, index.metadata);
  }

  /**
   * The opened files' identity (device, inode, size, modification time, as of opening): what is remembered of a
   * checkpoint's content is keyed by it, so a file rewritten in place or replaced is not taken for the one read.
   */
  get identity(): string {
    return this.shards.map((s) => s.identity).join(',');
  }

  /** Every tensor, in layout order: file order, then data offset order. */
  tensors(): TensorInfo[] {
    return [...this.order];
  }

  /** True if the checkpoint has a tensor called `name`. */
  has(name: string): boolean {
    return this.byName.has(name);
  }

  /**
   * Describes one tensor.
   * @throws FormatError naming the checkpoint if there is no such tensor.
   */
  info(name: string): TensorInfo {
    return this.entry(name).info;
  }

  private entry(name: string): { info: TensorInfo; fh: FileHandle } {
    if (this.closed) throw new Error(`checkpoint ${this.path} is closed`);
    const e = this.byName.get(name);
    if (e === undefined) throw new FormatError(`no such tensor`, { file: this.path, tensor: name });
    return e;
  }

  /**
   * Reads one tensor's bytes, exactly as stored (little-endian).
   * @returns A fresh, 8-byte aligned array of `info(name).byteLength` bytes.
   * @throws FormatError if there is no such tensor.
   * @throws TruncatedError if the file shrank since it was opened.
   */
  async readRaw(name: string, opts: ReadOptions = {}): Promise<Uint8Array> {
    return this.readRawRange(name, 0, this.info(name).byteLength, opts);
  }

  /**
   * Reads `byteLength` bytes of a tensor starting `byteOffset` bytes into its data
   * (into the start of `opts.into` when given: that view is returned).
   * @throws RangeError (naming file and tensor) if the range is not inside the tensor or `into` is too small.
   * @throws FormatError, TruncatedError as {@link Checkpoint.readRaw}.
   */
  async readRawRange(
    name: string,
    byteOffset: number,
    byteLength: number,
    opts: ReadOptions & { into?: Uint8Array } = {},
  ): Promise<Uint8Array> {
    const { info, fh } = this.entry(name);
    checkRange(info, byteOffset, byteLength, info.byteLength, 'byte');
    let out: Uint8Array;
    if (opts.into === undefined) {
      const buf = Buffer.allocUnsafeSlow(byteLength);
      out = new Uint8Array(buf.buffer, buf.byteOffset, byteLength);
    } else if (opts.into.byteLength >= byteLength) {
      out = opts.into.subarray(0, byteLength);
    } else {
      throw new RangeError(
        `${info.file}, tensor "${info.name}": \`into\` holds ${opts.into.byteLength} bytes, ${byteLength} needed`,
      );
    }
    await readInto(fh, out, info.dataOffset + byteOffset, { file: info.file, tensor: info.name }, opts.signal);
    return out;
  }

  /**
   * Reads one tensor and converts it to F32 (exactly: every F16/BF16 value is an F32).
   * @param opts `signal`, and `into` to reuse an output array (see {@link ReadF32Options}).
   * @throws RangeError if `into` is too small.
   * @throws As {@link Checkpoint.readRaw}.
   */
  async readF32(name: string, opts: ReadF32Options = {}): Promise<Float32Array> {
    return this.readRangeF32(name, 0, this.info(name).numel, opts);
  }

  /**
   * Reads `count` elements of a tensor from element `startElement` (in
   * row-major order) as F32, for tensors too large to hold whole.
   * @param opts As {@link Checkpoint.readF32}.
   * @throws RangeError (naming file and tensor) if the range is not inside the tensor or `into` is too small.
   * @throws FormatError, TruncatedError as {@link Checkpoint.readRaw}.
   */
  async readRangeF32(
    name: string,
    startElement: number,
    count: number,
    opts: ReadF32Options = {},
  ): Promise<Float32Array> {
    const { info, fh } = this.entry(name);
    checkRange(info, startElement, count, info.numel, 'element');
    const size = bytesPerElement(info.dtype);
    const where = { file: info.file, tensor: info.name };
    let out: Float32Array;
    if (opts.into === undefined) {
      const buf = Buffer.allocUnsafeSlow(count * 4);
      out = new Float32Array(buf.buffer, buf.byteOffset, count);
    } else if (opts.into.length >= count) {
      out = opts.into.subarray(0, count);
    } else {
      throw new RangeError(
        `${info.file}, tensor "${info.name}": \`into\` holds ${opts.into.length} elements, ${count} needed`,
      );
    }
    // Chunks are converted straight out of the read buffers, so the 16-bit
    // data never needs a tensor-sized buffer of its own.
    const { onRaw } = opts;
    await readChunks(
      fh,
      info.dataOffset + startElement * size,
      count * size,
      where,
      opts.signal,
      (chunk, offset) => {
        onRaw?.(chunk, offset);
        decodeToF32(chunk, info.dtype, out.subarray(offset / size, (offset + chunk.byteLength) / size));
      },
      // The raw chunks' consumer may hold early ones until their turn: bounded.
      onRaw === undefined ? Infinity : ORDERED_LOOKAHEAD,
    );
    return out;
  }

  /** Closes every file handle; later reads throw. Safe to call twice. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.shards.map((s) => s.fh.close()));
  }
}

function checkRange(info: TensorInfo, start: number, count: number, total: number, unit: string): void {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(count) || start < 0 || count < 0 || start + count > total) {
    throw new RangeError(
      `${info.file}, tensor "${info.name}": ${unit} range [${start}, ${start}+${count}) is outside [0, ${total})`,
    );
  }
}
