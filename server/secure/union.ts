/**
 * The union U of a secure job's supports: built from the parties' spooled positions-only uploads when SUPPORT
 * closes, stored as `<job>/secure/union.json` (tensors in the base checkpoint's order, the order of every delta, with
 * their shapes and counts) and `union.bin` (their positions, uint32 little-endian, tensor after tensor). Word j of
 * every masked vector is the j-th position of U in that order. Built as the supports are read, a window of U at a
 * time, and read back in slices ({@link unionPositions}): the server never holds a whole tensor's positions.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { syncFolder } from '../../proto/fs-sync.js';
import { readWordsAt } from '../../proto/safetensors/fs-util.js';
import { TensorKind } from '../../proto/gen/dppa/v1/sparse.js';
import { readDeltaFile, readDeltaHeader, TensorAssembler } from '../../proto/sparse/index.js';
import { unionStreams, type PositionPiece } from '../../proto/secure/index.js';
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

/**
 * The positions of partition `partition` of a spooled one-tensor support file holding tensor `name`, a chunk at a time
 * (each checked as {@link TensorAssembler} checks them, a RANGE chunk never expanded), valid until the next is asked
 * for.
 * @throws Error naming the file and tensor for a position at or beyond 2^32 (U's positions are uint32)
 */
async function* chunkPositions(file: string, name: string, partition: number): AsyncGenerator<PositionPiece> {
  const assembler = new TensorAssembler({ file, entries: 'stream', values: false });
  for await (const record of readDeltaFile(file, { transient: true })) {
    if (record.header !== undefined) continue;
    const c = assembler.push(record);
    if (c?.partition !== partition) continue;
    const last = c.range ? c.lastPositionAtLeast : c.positions[c.count - 1]!;
    if (last > 0xffffffff)
      throw new Error(`${file}: tensor "${name}" has positions beyond 2^32 − 1, which secure jobs do not support`);
    yield { first: c.firstPosition, count: c.count, positions: c.range ? undefined : c.positions };
  }
  if (!assembler.complete) throw new Error(`${file}: no complete tensor`);
}

/**
 * The streams of one spooled support file to unite, one per partition its tensor may have (each partition's
 * positions increase; partitions need not follow each other in position order), and the tensor's shape.
 */
async function supportStreams(
  file: string,
  name: string,
): Promise<{ shape: number[]; streams: AsyncIterable<PositionPiece>[] }> {
  const header = await readDeltaHeader(file);
  const plan = header.tensors[0];
  if (plan?.name !== name) throw new Error(`${file}: holds tensor "${plan?.name}", expected "${name}"`);
  // A linear tensor's entries are in partitions 1..P (one for the reference client), an outside one's in 0.
  const partitions = plan.kind === TensorKind.TENSOR_KIND_LINEAR ? header.levels.map((_, i) => i + 1) : [0];
  return { shape: plan.shape.map(Number), streams: partitions.map((p) => chunkPositions(file, name, p)) };
}

/**
 * Builds U from the supporters' spooled tensor files and stores it, tensor by tensor, each tensor's supports merged
 * as they are read and its union written as it is formed: the memory held is one chunk and one read buffer per stream
 * (per supporter and partition: each partition of a linear tensor is read as a stream of its own over the file) and
 * a window of U ({@link unionStreams}), whatever the tensors' sizes.
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
      const streams: AsyncIterable<PositionPiece>[] = [];
      for (const file of byTensor.get(name)!) {
        const got = await supportStreams(file, name);
        shape = got.shape;
        streams.push(...got.streams);
      }
      const count = await unionStreams(
        streams,
        (words) => fh.write(Buffer.from(words.buffer, words.byteOffset, words.byteLength)),
        pause,
      );
      tensors.push({ name, shape, count, offset });
      offset += count;
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

/** A union temp file untouched this long was left by a build that died (a live build writes a window of U at a time). */
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

/** Positions `from`..`from + count` − 1 of U in tensor `t` (all of them by default), read from `union.bin`. */
export function unionPositions(union: Union, t: UnionTensor, from = 0, count = t.count - from): Promise<Uint32Array> {
  const file = join(secureDir(union.jobDir), 'union.bin');
  return readWordsAt(
    file,
    t.offset + from,
    count,
    () => new Error(`${file}: ends before tensor "${t.name}" (${t.count} positions at ${t.offset})`),
  );
}
