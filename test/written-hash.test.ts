// WrittenFilesHash: the SHA-256 of a merge's weight files hashed as tensors are reported written (in any order, some
// twice) equals the SHA-256 of the committed files; a file with a tensor never reported (written by another replica)
// gets no digest, to be hashed again; a file gone midway gives no digest at all.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { SharedCheckpointWriter, writeCheckpoint, type TensorData } from '../proto/safetensors/index.js';
import { WrittenFilesHash } from '../server/merge/written-hash.js';

let dir: string;
// Large enough that a tensor takes several 1 MiB reads.
const tensors: TensorData[] = Array.from({ length: 6 }, (_, i) => ({
  name: `t${i}`,
  dtype: 'BF16' as const,
  shape: [i === 2 ? 700_000 : 30 + i, 2],
  data: Uint8Array.from({ length: (i === 2 ? 700_000 : 30 + i) * 4 }, (_, k) => (k * 13 + i * 5) & 0xff),
}));

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-written-hash-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('WrittenFilesHash', () => {
  it('hashes each weight file as the committed file hashes, whatever order the tensors are reported in', async () => {
    const layout = await writeCheckpoint(join(dir, 'reference'), tensors, { shardBytes: 1_000_000 });
    assert.ok(layout.sharded && layout.files.length >= 2);
    const tmp = join(dir, 'out.work');
    const out = join(dir, 'out');
    await SharedCheckpointWriter.layOut(tmp, out, layout);
    const writer = await SharedCheckpointWriter.open(tmp, out, layout);
    const hash = new WrittenFilesHash(tmp, out, layout);
    for (const i of [4, 0, 2, 2, 5]) {
      await writer.writeTensor(tensors[i]!.name, tensors[i]!.data);
      hash.written(tensors[i]!.name);
    }
    // t1 and t3 are written (by another replica, say) but never reported here: their files get no digest.
    for (const i of [1, 3]) await writer.writeTensor(tensors[i]!.name, tensors[i]!.data);
    await writer.close();
    const got = await hash.finish();
    await SharedCheckpointWriter.commit(tmp, out);
    assert.ok(got !== undefined);
    const whole = layout.files.filter((f) => f.tensors.every((t) => t.name !== 't1' && t.name !== 't3'));
    assert.ok(whole.length >= 1 && whole.length < layout.files.length);
    assert.deepEqual([...got.keys()].sort(), whole.map((f) => f.fileName).sort());
    for (const f of whole) {
      const bytes = await readFile(join(out, f.fileName));
      assert.deepEqual(got.get(f.fileName), {
        path: f.fileName,
        size: bytes.byteLength,
        sha256: createHash('sha256').update(bytes).digest('hex'),
      });
    }
  });

  it('gives no digest when a file cannot be read', async () => {
    const layout = await writeCheckpoint(join(dir, 'reference2'), tensors.slice(0, 2));
    const tmp = join(dir, 'gone.work');
    await SharedCheckpointWriter.layOut(tmp, join(dir, 'gone'), layout);
    const hash = new WrittenFilesHash(tmp, join(dir, 'gone'), layout);
    await unlink(join(tmp, layout.files[0]!.fileName));
    hash.written('t0');
    assert.equal(await hash.finish(), undefined);
  });
});
