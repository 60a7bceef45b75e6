/**
 * The union U of a secure job's supports: built from the parties' spooled positions-only uploads when SUPPORT
 * closes, stored as `<job>/secure/union.json` (tensors in the base checkpoint's order, the order of every delta, with
 * their shapes and counts) and `union.bin` (their positions, uint32 little-endian, tensor after tensor). Word j of
 * every masked vector is the j-th position of U in that order.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { readDeltaTensors } from '../../proto/sparse/index.js';
import { unionSupport } from '../../proto/secure/index.js';
import { writeFileDurably } from '../durable-write.js';
import { secureDir } from '../uploads/masked-spool.js';

/** One tensor of U. */
export interface UnionTensor {
  name: string;
  shape: number[];
  /** Positions of U in the tensor. */
  count: number;
  /** Index in U of its first position. */
  offset: number;
}

/** U: its tensors and their positions. */
export interface Union {
  tensors: UnionTensor[];
  /** Every position, tensor after tensor (`positions.subarray(t.offset, t.offset + t.count)` for tensor t). */
  positions: Uint32Array;
  size: number;
}

/** Positions of one spooled one-tensor file, all partitions, increasing. */
async function filePositions(file: string): Promise<{ name: string; shape: number[]; positions: Uint32Array }> {
  for await (const item of readDeltaTensors(file)) {
    if (item.kind !== 'tensor') continue;
    const t = item.tensor;
    const all = new Float64Array(t.partitions.reduce((n, p) => n + p.positions.length, 0));
    let k = 0;
    for (const p of t.partitions) {
      all.set(p.positions, k);
      k += p.positions.length;
    }
    all.sort();
    if (all.length > 0 && all[all.length - 1]! > 0xffffffff)
      throw new Error(`${file}: tensor "${t.name}" has positions beyond 2^32, which secure jobs do not support`);
    return { name: t.name, shape: t.shape.map(Number), positions: Uint32Array.from(all) };
  }
  throw new Error(`${file}: no tensor`);
}

/**
 * Builds U from the supporters' spooled tensor files and stores it.
 * @param files - Per supporter, its spool files (one tensor each).
 * @param baseOrder - The base checkpoint's tensor names in its order (U's tensor order).
 * @throws Error for a spooled tensor the base lacks (the upload's header check refuses those).
 */
export async function buildUnion(
  jobDir: string,
  files: readonly (readonly string[])[],
  baseOrder: readonly string[],
): Promise<Union> {
  const byTensor = new Map<string, { shape: number[]; supports: Uint32Array[] }>();
  for (const party of files) {
    for (const f of party) {
      const { name, shape, positions } = await filePositions(f);
      const entry = byTensor.get(name) ?? { shape, supports: [] };
      entry.supports.push(positions);
      byTensor.set(name, entry);
    }
  }
  const rank = new Map(baseOrder.map((n, i) => [n, i]));
  for (const n of byTensor.keys())
    if (!rank.has(n)) throw new Error(`tensor "${n}" of a spooled support is not in the base checkpoint`);
  const names = [...byTensor.keys()].sort((a, b) => rank.get(a)! - rank.get(b)!);
  const parts = names.map((n) => unionSupport(byTensor.get(n)!.supports));
  const size = parts.reduce((s, p) => s + p.length, 0);
  const positions = new Uint32Array(size);
  const tensors: UnionTensor[] = [];
  let offset = 0;
  names.forEach((name, i) => {
    positions.set(parts[i]!, offset);
    tensors.push({ name, shape: byTensor.get(name)!.shape, count: parts[i]!.length, offset });
    offset += parts[i]!.length;
  });
  const dir = secureDir(jobDir);
  await mkdir(dir, { recursive: true });
  await writeFileDurably(
    join(dir, 'union.bin'),
    Buffer.from(positions.buffer, positions.byteOffset, positions.byteLength),
  );
  await writeFileDurably(join(dir, 'union.json'), `${JSON.stringify({ tensors, size })}\n`);
  return { tensors, positions, size };
}

/** U as stored by {@link buildUnion}. */
export async function readUnion(jobDir: string): Promise<Union> {
  const dir = secureDir(jobDir);
  const meta = JSON.parse(await readFile(join(dir, 'union.json'), 'utf8')) as { tensors: UnionTensor[]; size: number };
  const bytes = await readFile(join(dir, 'union.bin'));
  const positions = new Uint32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
  if (positions.length !== meta.size)
    throw new Error(`${join(dir, 'union.bin')}: ${positions.length} positions, expected ${meta.size}`);
  return { tensors: meta.tensors, positions, size: meta.size };
}
