/**
 * Shapes shared by the reader and the writer: where each tensor lives, and
 * the arithmetic that turns a shape into a byte count.
 */

import { FormatError, UnsupportedDtypeError } from '../errors.js';
import { bytesPerElement, type Dtype, isDtype } from './dtype.js';

/** Name of the single weight file of an unsharded checkpoint folder. */
export const SINGLE_FILE_NAME = 'model.safetensors';

/** Name of the shard index of a sharded checkpoint folder. */
export const INDEX_FILE_NAME = 'model.safetensors.index.json';

/** One tensor of an open checkpoint, with everything needed to read it. */
export interface TensorInfo {
  /** Tensor name as stored in the header. */
  readonly name: string;
  readonly dtype: Dtype;
  /** Dimensions; `[]` is a scalar. */
  readonly shape: readonly number[];
  /** Number of elements (product of `shape`; may exceed 2^32). */
  readonly numel: number;
  /** `numel * bytesPerElement(dtype)`. */
  readonly byteLength: number;
  /** Absolute path of the file holding the data. */
  readonly file: string;
  /** Absolute byte offset of the first data byte within `file`. */
  readonly dataOffset: number;
}

/** A tensor as a layout describes it: no offsets, only what it is. */
export interface LayoutTensor {
  name: string;
  dtype: Dtype;
  shape: number[];
}

/** One weight file of a layout. */
export interface LayoutFile {
  /** Bare file name inside the checkpoint folder, e.g. `model-00001-of-00002.safetensors`. */
  fileName: string;
  /** The file's `__metadata__`, if it has one. */
  metadata: Record<string, string> | undefined;
  /** Tensors in the order their data appears in the file. */
  tensors: LayoutTensor[];
}

/**
 * Which tensor lives in which file, in which order: read from a checkpoint by
 * {@link Checkpoint.layout} and given to `CheckpointWriter.create` to produce
 * a checkpoint that mirrors it.
 */
export interface CheckpointLayout {
  /** True if the folder has a `model.safetensors.index.json`. */
  sharded: boolean;
  files: LayoutFile[];
  /** The index's `metadata` object (sharded only); the writer refreshes `total_size`. */
  indexMetadata: Record<string, unknown> | undefined;
}

/**
 * Number of elements of `shape`, checked to be exact in a JS number.
 * @throws FormatError if a dimension is not a non-negative integer or the product exceeds 2^53.
 */
export function numelOf(shape: readonly number[], where: { file: string; tensor: string }): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new FormatError(`shape ${JSON.stringify(shape)} has a dimension that is not a non-negative integer`, where);
    }
    n *= d;
  }
  if (!Number.isSafeInteger(n)) {
    throw new FormatError(`shape ${JSON.stringify(shape)} has more than 2^53 elements`, where);
  }
  return n;
}

/** Byte length of a tensor of `dtype` and `shape`. @throws FormatError as {@link numelOf}. */
export function byteLengthOf(dtype: Dtype, shape: readonly number[], where: { file: string; tensor: string }): number {
  const bytes = numelOf(shape, where) * bytesPerElement(dtype);
  if (!Number.isSafeInteger(bytes)) throw new FormatError(`tensor is larger than 2^53 bytes`, where);
  return bytes;
}

/**
 * Checks that a layout can be written: file names are bare `.safetensors`
 * names, each used once; tensor names are unique across files; dtypes and
 * shapes are valid; an unsharded layout has exactly one file.
 * @param layout The layout to check.
 * @param where Names the checkpoint in error messages.
 * @throws FormatError (or UnsupportedDtypeError) naming the file and tensor at fault.
 */
export function validateLayout(layout: CheckpointLayout, where: string): void {
  if (!layout.sharded && layout.files.length !== 1) {
    throw new FormatError(`an unsharded layout must have exactly one file, not ${layout.files.length}`, {
      file: where,
    });
  }
  const fileNames = new Set<string>();
  const tensorFile = new Map<string, string>();
  for (const f of layout.files) {
    const at = { file: `${where}/${f.fileName}` };
    if (!/^[^/\\]+\.safetensors$/.test(f.fileName) || f.fileName.startsWith('.')) {
      throw new FormatError(`file name must be a bare *.safetensors name`, at);
    }
    if (fileNames.has(f.fileName)) throw new FormatError(`file appears twice in the layout`, at);
    fileNames.add(f.fileName);
    for (const t of f.tensors) {
      const here = { ...at, tensor: t.name };
      if (t.name === '__metadata__') throw new FormatError(`"__metadata__" is reserved`, here);
      if (!isDtype(t.dtype)) throw new UnsupportedDtypeError(String(t.dtype), here);
      byteLengthOf(t.dtype, t.shape, here);
      const other = tensorFile.get(t.name);
      if (other !== undefined) throw new FormatError(`tensor also appears in ${other}`, here);
      tensorFile.set(t.name, f.fileName);
    }
  }
}
