/**
 * The unmasked sum's files (server/secure/secure-sum.ts `writeSum`), written a range of U at a time: for tensors of
 * U longer than a range, each file holds U's positions of its tensor with the decoded sum of the survivors' words,
 * checked against the words summed here modulo 2^32 and scaled by the fixed-point step; a job stopped between two
 * ranges of a tensor stops there.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { fixedPoint, stepOf } from '../proto/secure/index.js';
import { DEFAULT_MAX_CHUNK_ENTRIES, readDeltaTensors } from '../proto/sparse/index.js';
import { maskedFile, secureDir } from '../server/uploads/masked-spool.js';
import { secureSumFiles, sumDir, writeSum } from '../server/secure/secure-sum.js';
import { readUnion, unionPositions } from '../server/secure/union.js';

const root = await mkdtemp(join(tmpdir(), 'dppa-sum-file-'));
after(() => rm(root, { recursive: true, force: true }));

describe('the unmasked sum of a secure job', () => {
  it('writes each tensor of U with its positions and decoded sums, across the ranges it is read in', async () => {
    const jobDir = join(root, 'job');
    const dir = secureDir(jobDir);
    await mkdir(join(dir, 'masked'), { recursive: true });
    // U: a tensor of 2.5M positions (every 3rd of 7.5M, so longer than a range of 2^20), an empty one, a short one.
    const big = Float64Array.from({ length: 2_500_000 }, (_, i) => 3 * i + 1);
    const parts = [
      { name: 'big', shape: [7_500_000], positions: big },
      { name: 'none', shape: [8], positions: new Float64Array(0) },
      { name: 'small', shape: [8], positions: Float64Array.of(0, 5, 7) },
    ];
    let offset = 0;
    const tensors = parts.map((p) => {
      const t = { name: p.name, shape: p.shape, count: p.positions.length, offset };
      offset += p.positions.length;
      return t;
    });
    await writeFile(join(dir, 'union.json'), JSON.stringify({ tensors, size: offset }));
    const all = Uint32Array.from(parts.flatMap((p) => Array.from(p.positions)));
    await writeFile(join(dir, 'union.bin'), new Uint8Array(all.buffer));
    // Two survivors' words without masks (no keys to remove): j mod 1000 and −(j mod 7), as uint32.
    const a = Uint32Array.from({ length: offset }, (_, j) => j % 1000);
    const b = Uint32Array.from({ length: offset }, (_, j) => (2 ** 32 - (j % 7)) % 2 ** 32);
    await writeFile(maskedFile(jobDir, 'p1'), new Uint8Array(a.buffer));
    await writeFile(maskedFile(jobDir, 'p2'), new Uint8Array(b.buffer));
    const fp = fixedPoint(0.05, 2);
    const union = await readUnion(jobDir);
    // U's positions read in slices across the 2^20 boundary are those of the whole read.
    const whole = await unionPositions(union, union.tensors[0]!);
    assert.deepEqual(
      await unionPositions(union, union.tensors[0]!, 2 ** 20 - 3, 6),
      whole.subarray(2 ** 20 - 3, 2 ** 20 + 3),
    );
    await writeSum(jobDir, union, ['p1', 'p2'], { selfKeys: [], pairs: [] }, fp, 'base', new AbortController().signal);

    const files = secureSumFiles(jobDir);
    for (const t of union.tensors) {
      let seen = 0;
      for await (const item of readDeltaTensors(files.get(t.name)!)) {
        if (item.kind !== 'tensor') continue;
        seen++;
        assert.equal(item.tensor.name, t.name);
        const got = item.tensor.partitions[0]!;
        const want = parts.find((p) => p.name === t.name)!.positions;
        assert.deepEqual(got.positions, want, t.name);
        for (let j = 0; j < t.count; j++) {
          const w = t.offset + j;
          const expected = Math.fround(((w % 1000) - (w % 7)) * stepOf(fp));
          if (got.values[j] !== expected) assert.fail(`${t.name}[${j}]: ${got.values[j]}, expected ${expected}`);
        }
      }
      assert.equal(seen, 1, t.name);
    }
  });

  it('stops between two ranges of a tensor once the job is stopped, and leaves no file of it', async () => {
    const jobDir = join(root, 'stopped');
    const dir = secureDir(jobDir);
    await mkdir(join(dir, 'masked'), { recursive: true });
    // One tensor of U a little longer than a range (4 chunks of the default size), then a short one.
    const count = 4 * DEFAULT_MAX_CHUNK_ENTRIES + 10;
    const tensors = [
      { name: 'long', shape: [count], count, offset: 0 },
      { name: 'short', shape: [4], count: 2, offset: count },
    ];
    await writeFile(join(dir, 'union.json'), JSON.stringify({ tensors, size: count + 2 }));
    const positions = Uint32Array.from({ length: count + 2 }, (_, j) => (j < count ? j : j - count));
    await writeFile(join(dir, 'union.bin'), new Uint8Array(positions.buffer));
    await writeFile(maskedFile(jobDir, 'p1'), new Uint8Array(4 * (count + 2)));
    const union = await readUnion(jobDir);
    // The job is stopped once two checks of the signal passed: the one before the first tensor and, with the check per
    // range, the one before its first range; without it, the one before the second tensor (which is then written).
    const controller = new AbortController();
    const { signal } = controller;
    const check = signal.throwIfAborted.bind(signal);
    let checks = 0;
    signal.throwIfAborted = () => {
      checks++;
      check();
      if (checks === 2) controller.abort(new Error('job stopped'));
    };
    await assert.rejects(
      writeSum(jobDir, union, ['p1'], { selfKeys: [], pairs: [] }, fixedPoint(0.05, 2), 'base', signal),
      /^Error: job stopped$/,
    );
    // Stopped at the second range of the first tensor: neither file is left.
    assert.equal(checks, 3);
    assert.deepEqual(await readdir(sumDir(jobDir)), []);
  });
});
