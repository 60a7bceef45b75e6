/**
 * U's files on the server (server/secure/union.ts): tensor offsets read back through `unionPositions`, a size
 * mismatch refused by `readUnion`, the temporary files a crashed build left swept before a new build, and U built from
 * real spooled support files against the sorted set of the parties' positions.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { OutsidePolicy, PruneMethod } from '../proto/gen/dppa/v1/algorithm.js';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../proto/gen/dppa/v1/sparse.js';
import { UNION_SLICE } from '../proto/secure/index.js';
import { DELTA_FORMAT_VERSION, DeltaFileWriter, tensorRecords } from '../proto/sparse/index.js';
import { secureDir } from '../server/uploads/masked-spool.js';
import { buildUnion, readUnion, unionPositions, type SpooledSupport } from '../server/secure/union.js';

const root = await mkdtemp(join(tmpdir(), 'dppa-union-file-'));
after(() => rm(root, { recursive: true, force: true }));

/** Writes U's two files by hand: positions per tensor, in order. */
async function writeUnionFiles(jobDir: string, parts: { name: string; positions: number[] }[]): Promise<void> {
  const dir = secureDir(jobDir);
  await mkdir(dir, { recursive: true });
  let offset = 0;
  const tensors = parts.map((p) => {
    const t = { name: p.name, shape: [100], count: p.positions.length, offset };
    offset += p.positions.length;
    return t;
  });
  await writeFile(join(dir, 'union.json'), JSON.stringify({ tensors, size: offset }));
  const words = Uint32Array.from(parts.flatMap((p) => p.positions));
  await writeFile(join(dir, 'union.bin'), new Uint8Array(words.buffer));
}

describe('the union files of a secure job', () => {
  it('reads each tensor of several at its offset; refuses a union.bin of another size', async () => {
    const jobDir = join(root, 'offsets');
    const parts = [
      { name: 'a', positions: [1, 4, 7] },
      { name: 'b', positions: [] },
      { name: 'c', positions: [0, 5, 99, 3] },
    ];
    await writeUnionFiles(jobDir, parts);
    const u = await readUnion(jobDir);
    assert.equal(u.size, 7);
    for (const [i, t] of u.tensors.entries())
      assert.deepEqual([...(await unionPositions(u, t))], parts[i]!.positions, t.name);
    // One word short.
    const dir = secureDir(jobDir);
    await writeFile(join(dir, 'union.bin'), new Uint8Array(Uint32Array.from([1, 4, 7, 0, 5, 99]).buffer));
    await assert.rejects(readUnion(jobDir), /6 positions, expected 7/);
    // Read through a list that no longer matches the file: the end of the file is an error, not zeros.
    await assert.rejects(unionPositions(u, u.tensors[2]!), /ends before tensor "c"/);
  });

  it('a build sweeps the stale temporary files of a crashed one, keeps a live one; a build given up leaves none', async () => {
    const jobDir = join(root, 'temps');
    const dir = secureDir(jobDir);
    await mkdir(dir, { recursive: true });
    const stale = join(dir, 'union.bin.tmp-0a1b2c3d4e5f');
    const live = join(dir, 'union.bin.tmp-aaaaaaaaaaaa');
    await writeFile(stale, 'cut off');
    await writeFile(live, 'being written');
    const old = new Date(Date.now() - 60 * 60 * 1000);
    await utimes(stale, old, old);
    await assert.rejects(
      buildUnion(jobDir, [], [], () => Promise.reject(new Error('claim lost'))),
      /claim lost/,
    );
    assert.deepEqual((await readdir(dir)).sort(), ['union.bin.tmp-aaaaaaaaaaaa']);
    const u = await buildUnion(jobDir, [], []);
    assert.equal(u.size, 0);
    assert.deepEqual((await readdir(dir)).sort(), ['union.bin', 'union.bin.tmp-aaaaaaaaaaaa', 'union.json']);
  });
});

/** One tensor of a party's support: its kind, levels (partitions 1..P of a linear tensor) and positions by partition. */
interface SupportTensor {
  name: string;
  shape: number[];
  linear: boolean;
  /** Positions by partition (index p: partition p), each increasing. */
  partitions: number[][];
  /** Most positions a chunk holds (a whole tensor in one RANGE chunk when it is the tensor's size). */
  chunkEntries?: number;
}

/** Writes a one-tensor positions-only `.dppa` file as the spool holds a support's tensor. */
async function writeSupport(file: string, t: SupportTensor): Promise<string> {
  const levels = t.linear ? t.partitions.slice(1).map((_, i) => 0.5 + i / 10) : [0.9];
  const header: DeltaHeader = {
    formatVersion: DELTA_FORMAT_VERSION,
    baseFingerprint: 'base',
    method: 'dp',
    rate: 0.9,
    levels,
    options: {},
    valueDtype: ValueDtype.VALUE_DTYPE_NONE,
    tensors: [
      {
        name: t.name,
        shape: t.shape.map(BigInt),
        kind: t.linear ? TensorKind.TENSOR_KIND_LINEAR : TensorKind.TENSOR_KIND_OUTSIDE,
        layer: t.linear ? 0 : -1,
        levelRates: t.linear ? levels : [],
        sent: true,
        baseSha256: new Uint8Array(0),
      },
    ],
    producer: 'test',
    pruneMethod: PruneMethod.PRUNE_METHOD_DP,
    outside: OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED,
    valueKind: ValueKind.VALUE_KIND_UNSPECIFIED,
  };
  const none = new Float32Array(0);
  const w = await DeltaFileWriter.create(file);
  await w.write({ header });
  const parts = t.partitions.map((p) => ({ positions: Float64Array.from(p), values: none }));
  const opts = { valueDtype: ValueDtype.VALUE_DTYPE_NONE, maxChunkEntries: t.chunkEntries };
  for (const r of tensorRecords(t.name, t.shape, parts, opts)) await w.write(r);
  await w.close();
  return file;
}

/** Deterministic numbers in [0, 1) (mulberry32). */
function random(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The positions below `numel` that `keep` picks. */
function pick(numel: number, keep: (x: number) => boolean): number[] {
  const out: number[] = [];
  for (let x = 0; x < numel; x++) if (keep(x)) out.push(x);
  return out;
}

describe('the union built from spooled supports', () => {
  it('equals the sorted set of every party’s positions, tensor by tensor in the base order, across windows', async () => {
    const jobDir = join(root, 'build');
    const spool = join(root, 'build-spool');
    await mkdir(spool, { recursive: true });
    const rnd = random(17);
    // More than UNION_SLICE positions in U for the large tensors, so that their union crosses window boundaries.
    const big = [1100, 1000];
    const numel = big[0]! * big[1]!;
    assert.ok(numel > UNION_SLICE);
    const whole = pick(numel, () => true);
    const tenth = (): number[] => pick(numel, () => rnd() < 0.1);
    const third = pick(numel, () => rnd() < 0.3);
    // Party b's linear support in two partitions interleaved in position order (a client with two levels).
    const inFirst = third.map(() => rnd() < 0.5);
    const parties: SupportTensor[][] = [
      [
        // Whole, in chunks of the default size (RANGE chunks).
        { name: 'embed', shape: big, linear: false, partitions: [whole] },
        { name: 'q', shape: big, linear: true, partitions: [[], tenth()] },
        { name: 'even', shape: [4000], linear: true, partitions: [[], pick(4000, (x) => x % 2 === 0)] },
        { name: 'norm', shape: [64], linear: false, partitions: [[]] },
      ],
      [
        // Whole, in one RANGE chunk of the tensor's size; tensors listed out of the base order.
        { name: 'norm', shape: [64], linear: false, partitions: [[]] },
        {
          name: 'q',
          shape: big,
          linear: true,
          partitions: [[], third.filter((_, i) => inFirst[i]), third.filter((_, i) => !inFirst[i])],
        },
        { name: 'embed', shape: big, linear: false, partitions: [whole], chunkEntries: numel },
        { name: 'odd', shape: [4000], linear: true, partitions: [[], pick(4000, (x) => x % 2 === 1)] },
      ],
      [
        { name: 'embed', shape: big, linear: false, partitions: [tenth()], chunkEntries: 1000 },
        { name: 'q', shape: big, linear: true, partitions: [[], []] },
        { name: 'even', shape: [4000], linear: true, partitions: [[], pick(4000, (x) => x % 4 === 0 || x === 3999)] },
      ],
    ];
    const files: SpooledSupport[][] = [];
    for (const [i, tensors] of parties.entries()) {
      files.push([]);
      for (const t of tensors) {
        const file = await writeSupport(join(spool, `${i}-${t.name}.dppa`), t);
        files[i]!.push({ name: t.name, file });
      }
    }
    const baseOrder = ['embed', 'unsent', 'norm', 'q', 'even', 'odd'];
    const u = await buildUnion(jobDir, files, baseOrder);

    // Expected: per tensor of the base order that some party sent, the sorted set of all parties' positions.
    let offset = 0;
    const expected = baseOrder.flatMap((name) => {
      const sent = parties.flat().filter((t) => t.name === name);
      if (sent.length === 0) return [];
      const positions = [...new Set(sent.flatMap((t) => t.partitions.flat()))].sort((a, b) => a - b);
      const t = { name, shape: sent[0]!.shape, count: positions.length, offset, positions };
      offset += positions.length;
      return [t];
    });
    assert.deepEqual(
      u.tensors,
      expected.map(({ positions: _, ...t }) => t),
    );
    assert.equal(u.size, offset);
    assert.deepEqual(await readUnion(jobDir), u);
    for (const [i, t] of u.tensors.entries()) {
      const got = await unionPositions(u, t);
      const want = expected[i]!.positions;
      assert.equal(got.length, want.length, t.name);
      assert.ok(
        want.every((x, j) => got[j] === x),
        `${t.name}: first difference at ${want.findIndex((x, j) => got[j] !== x)}`,
      );
    }
    // The union of the whole embedding is every position; the disjoint supports together give every position too.
    assert.equal(u.tensors[0]!.count, numel);
    assert.equal(u.tensors.find((t) => t.name === 'odd')!.count, 2000);
  });

  it('refuses a spooled file that holds another tensor than it is listed for, and leaves no temporary file', async () => {
    const jobDir = join(root, 'wrong');
    const spool = join(root, 'wrong-spool');
    await mkdir(spool, { recursive: true });
    const file = await writeSupport(join(spool, 'x.dppa'), {
      name: 'x',
      shape: [10],
      linear: false,
      partitions: [[1, 2]],
    });
    await assert.rejects(buildUnion(jobDir, [[{ name: 'y', file }]], ['y']), /holds tensor "x", expected "y"/);
    assert.deepEqual(await readdir(secureDir(jobDir)), []);
  });

  it('refuses a position at or beyond 2^32 naming the spooled file and tensor (a Golomb chunk, a RANGE chunk)', async () => {
    const spool = join(root, 'wide-spool');
    await mkdir(spool, { recursive: true });
    // More than 2^32 elements, so that the file itself is valid.
    const shape = [65537, 65536];
    const cases: [string, SupportTensor][] = [
      ['golomb', { name: 'wide', shape, linear: false, partitions: [[1, 2 ** 32 + 3]] }],
      // 2^32 − 2 … 2^32 + 1 in partition 2 (the first chunk of partition 1 is below 2^32).
      [
        'range',
        { name: 'wide', shape, linear: true, partitions: [[], [5, 9], [0, 1, 2, 3].map((i) => 2 ** 32 - 2 + i)] },
      ],
    ];
    for (const [label, t] of cases) {
      const jobDir = join(root, `wide-${label}`);
      const file = await writeSupport(join(spool, `${label}.dppa`), t);
      const ok = await writeSupport(join(spool, `${label}-ok.dppa`), {
        ...t,
        shape: [100],
        linear: false,
        partitions: [[4, 7]],
      });
      await assert.rejects(
        buildUnion(jobDir, [[{ name: 'wide', file }], [{ name: 'wide', file: ok }]], ['wide']),
        (e: unknown) =>
          e instanceof Error &&
          e.message === `${file}: tensor "wide" has positions beyond 2^32 − 1, which secure jobs do not support`,
        label,
      );
      assert.deepEqual(await readdir(secureDir(jobDir)), [], label);
    }
  });
});
