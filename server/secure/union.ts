/**
 * The union U of a secure job's supports: built from the parties' spooled positions-only uploads when SUPPORT
 * closes, stored as `<job>/secure/union.json` (tensors in the base checkpoint's order, the order of every delta, with
 * their shapes and counts) and `union.bin` (their positions, uint32 little-endian, tensor after tensor). Word j of
 * every masked vector is the j-th position of U in that order. Built, served and read one tensor at a time: the
 * server never holds more of U than one tensor's positions.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { syncFolder } from '../../proto/fs-sync.js';
import { readWordsAt } from '../../proto/safetensors/fs-util.js';
import { readDeltaTensors } from '../../proto/sparse/index.js';
import { UNION_SLICE, unionSupportYielding } from '../../proto/secure/index.js';
import { TEMP_MARK, writeFileDurably } from '../durable-write.js';
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

/** U: its tensors; their positions stay in `union.bin` of the job's folder (read them with {@link unionPositions}). */
export interface Union {
  jobDir: string;
  tensors: UnionTensor[];
  size: number;
}

/** A spooled one-tensor file of a support upload. */
export interface SpooledSupport {
  name: string;
  file: string;
}

/** Awaited between slices of work over a whole tensor: the server keeps answering calls and keepalive pings. */
export const pause = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** True when `a` is non-decreasing (checked in slices, `pause` between them). */
async function sortedYielding(a: Uint32Array): Promise<boolean> {
  for (let i = 1; i < a.length; i += UNION_SLICE) {
    const end = Math.min(a.length, i + UNION_SLICE);
    for (let j = i; j < end; j++) if (a[j]! < a[j - 1]!) return false;
    await pause();
  }
  return true;
}

/** Positions of one spooled one-tensor file, all partitions, increasing. */
async function filePositions(file: string): Promise<{ name: string; shape: number[]; positions: Uint32Array }> {
  for await (const item of readDeltaTensors(file)) {
    if (item.kind !== 'tensor') continue;
    const t = item.tensor;
    // uint32 from the start (the positions' numbers, checked): half the bytes of a Float64Array copy.
    const all = new Uint32Array(t.partitions.reduce((n, p) => n + p.positions.length, 0));
    let k = 0;
    for (const p of t.partitions)
      for (let j = 0; j < p.positions.length; j += UNION_SLICE) {
        const end = Math.min(p.positions.length, j + UNION_SLICE);
        for (let i = j; i < end; i++) {
          const x = p.positions[i]!;
          if (x > 0xffffffff)
            throw new Error(`${file}: tensor "${t.name}" has positions beyond 2^32, which secure jobs do not support`);
          all[k++] = x;
        }
        await pause();
      }
    // Partitions come in position order: the sort (synchronous, long over millions) only when they do not.
    if (!(await sortedYielding(all))) all.sort();
    return { name: t.name, shape: t.shape.map(Number), positions: all };
  }
  throw new Error(`${file}: no tensor`);
}

/**
 * Builds U from the supporters' spooled tensor files and stores it, tensor by tensor (only one tensor's supports and
 * union are held at a time).
 * @param files - Per supporter, its spool files (one tensor each), with their tensor names.
 * @param baseOrder - The base checkpoint's tensor names in its order (U's tensor order).
 * @param beforeRename - Awaited once the file is written, before it replaces `union.bin`: throws to give the build up.
 * @throws Error for a spooled tensor the base lacks (the upload's header check refuses those).
 */
export async function buildUnion(
  jobDir: string,
  files: readonly (readonly SpooledSupport[])[],
  baseOrder: readonly string[],
  beforeRename?: () => Promise<void>,
): Promise<Union> {
  const byTensor = new Map<string, string[]>();
  for (const party of files) for (const f of party) byTensor.set(f.name, [...(byTensor.get(f.name) ?? []), f.file]);
  const rank = new Map(baseOrder.map((n, i) => [n, i]));
  for (const n of byTensor.keys())
    if (!rank.has(n)) throw new Error(`tensor "${n}" of a spooled support is not in the base checkpoint`);
  const names = [...byTensor.keys()].sort((a, b) => rank.get(a)! - rank.get(b)!);
  const dir = secureDir(jobDir);
  await mkdir(dir, { recursive: true });
  const bin = join(dir, 'union.bin');
  await removeStaleUnionTemps(dir);
  const tmp = `${bin}${TEMP_MARK}${randomBytes(6).toString('hex')}`;
  const fh = await open(tmp, 'wx');
  const tensors: UnionTensor[] = [];
  let offset = 0;
  try {
    for (const name of names) {
      let shape: number[] = [];
      const supports: Uint32Array[] = [];
      for (const file of byTensor.get(name)!) {
        const got = await filePositions(file);
        if (got.name !== name) throw new Error(`${file}: holds tensor "${got.name}", expected "${name}"`);
        shape = got.shape;
        supports.push(got.positions);
      }
      const part = await unionSupportYielding(supports, pause);
      await fh.write(Buffer.from(part.buffer, part.byteOffset, part.byteLength));
      tensors.push({ name, shape, count: part.length, offset });
      offset += part.length;
    }
    await fh.sync();
    await fh.close();
    await beforeRename?.();
    await rename(tmp, bin);
  } catch (err) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
  await syncFolder(dir);
  await writeFileDurably(join(dir, 'union.json'), `${JSON.stringify({ tensors, size: offset })}\n`);
  return { jobDir, tensors, size: offset };
}

/** A union temp file untouched this long was left by a build that died (a live build writes one tensor at a time). */
const STALE_UNION_TEMP_MS = 10 * 60 * 1000;

/**
 * Deletes the `union.*.tmp-*` files a build that crashed left (up to 4 bytes a position each), before a new build:
 * only those untouched for {@link STALE_UNION_TEMP_MS}, since another replica may be building right now.
 */
async function removeStaleUnionTemps(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    if (!name.startsWith('union.') || !name.includes(TEMP_MARK)) continue;
    const file = join(dir, name);
    const st = await stat(file).catch(() => undefined);
    if (st !== undefined && Date.now() - st.mtimeMs >= STALE_UNION_TEMP_MS) await rm(file, { force: true });
  }
}

/** U as stored by {@link buildUnion} (its tensor list; the positions are read tensor by tensor). */
export async function readUnion(jobDir: string): Promise<Union> {
  const dir = secureDir(jobDir);
  const meta = JSON.parse(await readFile(join(dir, 'union.json'), 'utf8')) as { tensors: UnionTensor[]; size: number };
  const bytes = (await stat(join(dir, 'union.bin'))).size;
  if (bytes !== meta.size * 4)
    throw new Error(`${join(dir, 'union.bin')}: ${bytes / 4} positions, expected ${meta.size}`);
  return { jobDir, tensors: meta.tensors, size: meta.size };
}

/** The positions of U in tensor `t`, read from `union.bin`. */
export function unionPositions(union: Union, t: UnionTensor): Promise<Uint32Array> {
  const file = join(secureDir(union.jobDir), 'union.bin');
  return readWordsAt(
    file,
    t.offset,
    t.count,
    () => new Error(`${file}: ends before tensor "${t.name}" (${t.count} positions at ${t.offset})`),
  );
}
