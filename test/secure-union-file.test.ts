/**
 * U's files on the server (server/secure/union.ts): tensor offsets read back through `unionPositions`, a size
 * mismatch refused by `readUnion`, and the temporary files a crashed build left swept before a new build.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { secureDir } from '../server/uploads/masked-spool.js';
import { buildUnion, readUnion, unionPositions } from '../server/secure/union.js';

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
