import assert from 'node:assert/strict';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ByteSource } from '../proto/sparse/byte-source.js';

const bytes = Uint8Array.from({ length: 100 }, (_, i) => i);
let dir: string;
let file: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-byte-source-'));
  file = join(dir, 'bytes');
  await writeFile(file, bytes);
});
after(() => rm(dir, { recursive: true, force: true }));

void describe('ByteSource', () => {
  void it('hands out the file in order, through its buffer or into memory of their own', async () => {
    const fh = await open(file, 'r');
    try {
      const src = new ByteSource(fh, 16);
      assert.deepEqual([...(await src.take(3))!], [0, 1, 2]);
      // Partly buffered, the rest read straight into its memory, with spare bytes before it.
      const own = (await src.takeOwn(20, 6))!;
      assert.deepEqual(
        [...own],
        Array.from({ length: 20 }, (_, i) => 3 + i),
      );
      assert.equal(own.byteOffset, 6);
      assert.equal(own.buffer.byteLength, 26);
      assert.deepEqual([...(await src.take(5))!], [23, 24, 25, 26, 27]);
      // Wholly buffered: still a copy, which the next reads leave alone.
      const small = (await src.takeOwn(2))!;
      assert.deepEqual(
        [...(await src.take(10))!],
        Array.from({ length: 10 }, (_, i) => 30 + i),
      );
      assert.deepEqual([...small], [28, 29]);
      // Larger than the buffer.
      assert.deepEqual(
        [...(await src.take(40))!],
        Array.from({ length: 40 }, (_, i) => 40 + i),
      );
      assert.equal(src.offset, 80);
      assert.equal(await src.takeOwn(30), undefined);
      assert.equal(src.available, 20);
    } finally {
      await fh.close();
    }
  });
});
