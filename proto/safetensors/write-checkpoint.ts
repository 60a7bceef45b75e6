/**
 * One-call checkpoint writing for test fixtures and generated checkpoints.
 */

import type { Dtype } from './dtype.js';
import type { CheckpointLayout, LayoutFile } from './layout.js';
import { byteLengthOf, SINGLE_FILE_NAME } from './layout.js';
import { CheckpointWriter } from './writer.js';

/** A tensor with its data, as {@link writeCheckpoint} takes it. */
export interface TensorData {
  name: string;
  dtype: Dtype;
  shape: number[];
  /** Little-endian bytes in `dtype`. */
  data: Uint8Array;
}

/** Options of {@link writeCheckpoint}. */
export interface WriteCheckpointOptions {
  /**
   * Start a new shard when adding a tensor would take the current one past
   * this many data bytes (a tensor larger than this gets a shard of its own).
   * If that yields one shard, a plain `model.safetensors` is written, as
   * Hugging Face does. @default unlimited: one `model.safetensors`
   */
  shardBytes?: number;
  /** `__metadata__` of every file written. @default none */
  metadata?: Record<string, string>;
  /** Replace `outDir` if it exists. @default false */
  overwrite?: boolean;
}

/** Hugging Face's shard naming: `model-00001-of-00003.safetensors`. */
function shardName(i: number, n: number): string {
  const pad = (k: number): string => String(k).padStart(5, '0');
  return `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
}

/**
 * Plans the layout {@link writeCheckpoint} would write, tensors kept in the given order.
 * @throws FormatError if a shape is invalid.
 */
export function planLayout(
  tensors: readonly Omit<TensorData, 'data'>[],
  opts: WriteCheckpointOptions = {},
): CheckpointLayout {
  const groups: Omit<TensorData, 'data'>[][] = [[]];
  let size = 0;
  for (const t of tensors) {
    const bytes = byteLengthOf(t.dtype, t.shape, { file: '(new checkpoint)', tensor: t.name });
    const current = groups[groups.length - 1]!;
    if (opts.shardBytes !== undefined && current.length > 0 && size + bytes > opts.shardBytes) {
      groups.push([]);
      size = 0;
    }
    groups[groups.length - 1]!.push(t);
    size += bytes;
  }
  const sharded = groups.length > 1;
  const files = groups.map((g, i): LayoutFile => ({
    fileName: sharded ? shardName(i, groups.length) : SINGLE_FILE_NAME,
    metadata: opts.metadata,
    tensors: g.map((t) => ({ name: t.name, dtype: t.dtype, shape: [...t.shape] })),
  }));
  return { sharded, files, indexMetadata: sharded ? {} : undefined };
}

/**
 * Writes a whole checkpoint from in-memory tensors, atomically (see
 * {@link CheckpointWriter}).
 * @param outDir Destination folder.
 * @param tensors Tensors in the order they are laid out.
 * @param opts See {@link WriteCheckpointOptions}.
 * @returns The layout written.
 * @throws FormatError naming file and tensor if a tensor's data length does not match its shape.
 * @throws Error with code EEXIST if `outDir` exists and `overwrite` is not set.
 */
export async function writeCheckpoint(
  outDir: string,
  tensors: readonly TensorData[],
  opts: WriteCheckpointOptions = {},
): Promise<CheckpointLayout> {
  const layout = planLayout(tensors, opts);
  const writer = await CheckpointWriter.create(outDir, layout, { overwrite: opts.overwrite === true });
  try {
    for (const t of tensors) await writer.writeTensor(t.name, t.data);
    await writer.commit();
  } finally {
    await writer.abort();
  }
  return layout;
}
