/**
 * `model.safetensors.index.json`: `{"metadata": {...}, "weight_map":
 * {"tensor": "model-00001-of-00002.safetensors", ...}}`.
 */

import { readFile, stat } from 'node:fs/promises';
import { FormatError } from '../errors.js';

/** A validated shard index. */
export interface ShardIndex {
  metadata: Record<string, unknown> | undefined;
  /** Tensor name → bare shard file name. */
  weightMap: Map<string, string>;
  /** Distinct shard file names, sorted (HF numbers them, so this is shard order). */
  files: string[];
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Reads and validates a shard index.
 * @param file Absolute path of the index.
 * @param maxBytes Largest index accepted.
 * @throws FormatError naming the index (and tensor) if it is too large, not
 *   JSON, lacks a `weight_map` of strings, or names a shard outside its folder.
 */
export async function readShardIndex(file: string, maxBytes: number): Promise<ShardIndex> {
  const { size } = await stat(file);
  if (size > maxBytes) throw new FormatError(`index is ${size} bytes, over the limit of ${maxBytes}`, { file });
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file, 'utf8')) as unknown;
  } catch (cause) {
    throw new FormatError(`index is not valid JSON: ${(cause as Error).message}`, { file, cause });
  }
  if (!isPlainObject(json)) throw new FormatError(`index is not a JSON object`, { file });
  const { metadata, weight_map: map } = json;
  if (metadata !== undefined && metadata !== null && !isPlainObject(metadata)) {
    throw new FormatError(`"metadata" is not an object`, { file });
  }
  if (!isPlainObject(map)) throw new FormatError(`"weight_map" is missing or not an object`, { file });
  const weightMap = new Map<string, string>();
  for (const [tensor, shard] of Object.entries(map)) {
    // A shard name with a path in it could make the reader open files
    // outside the checkpoint folder.
    if (typeof shard !== 'string' || !/^[^/\\]+$/.test(shard) || shard === '.' || shard === '..') {
      throw new FormatError(`weight_map entry ${JSON.stringify(shard)} is not a bare file name`, { file, tensor });
    }
    weightMap.set(tensor, shard);
  }
  const files = [...new Set(weightMap.values())].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return { metadata: isPlainObject(metadata) ? metadata : undefined, weightMap, files };
}
