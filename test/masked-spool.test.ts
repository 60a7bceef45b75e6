import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { crc32c } from '../proto/sparse/index.js';
import { InvalidArgumentError } from '../server/errors.js';
import { discardSecureData } from '../server/secure/secure-sum.js';
import {
  appendMasked,
  maskedClipped,
  maskedFile,
  maskedWordsHeld,
  readMasked,
  SecureDataDiscardedError,
  secureDir,
} from '../server/uploads/masked-spool.js';

function piece(offset: number, words: number[], total: number) {
  const bytes = new Uint8Array(Uint32Array.from(words).buffer);
  return { offset: BigInt(offset), words: bytes, crc32c: crc32c(bytes), totalWords: BigInt(total) };
}

async function* of<T>(...xs: T[]): AsyncGenerator<T> {
  for (const x of xs) yield await Promise.resolve(x);
}

test('a torn write (part of a word on disk) is cut off: the resumed words land at their place', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'masked-spool-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const total = 8;
  assert.equal(await appendMasked(dir, 'p1', total, of(piece(0, [1, 2, 3], total)), () => {}), 3);
  // What a short write (ENOSPC mid-chunk) leaves: two bytes of the next word.
  await writeFile(maskedFile(dir, 'p1'), Uint8Array.of(0xaa, 0xbb), { flag: 'a' });
  assert.equal(await maskedWordsHeld(dir, 'p1'), 3);
  assert.equal(await appendMasked(dir, 'p1', total, of(piece(3, [4, 5, 6, 7, 8], total)), () => {}), total);
  assert.equal((await stat(maskedFile(dir, 'p1'))).size, total * 4);
  assert.deepEqual([...(await readMasked(dir, 'p1', 0, total))], [1, 2, 3, 4, 5, 6, 7, 8]);
});

test('a zero-word chunk at |U| keeps a whole vector as it is', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'masked-spool-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await appendMasked(dir, 'p1', 2, of(piece(0, [9, 10], 2)), () => {});
  assert.equal(await appendMasked(dir, 'p1', 2, of(piece(2, [], 2)), () => {}), 2);
  assert.deepEqual([...(await readMasked(dir, 'p1', 0, 2))], [9, 10]);
});

test('after the discard (the job ended) no masked word is written: an open stream stops, a new one is refused', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'masked-spool-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const total = 6;
  await appendMasked(dir, 'p1', total, of(piece(0, [1, 2], total)), () => {});
  // A stream open while the job ends: its first chunk lands, the discard runs, its next chunk is refused.
  async function* late(): AsyncGenerator<ReturnType<typeof piece>> {
    yield piece(2, [3, 4], total);
    assert.equal(await discardSecureData(dir), true);
    yield piece(4, [5, 6], total);
  }
  await assert.rejects(
    appendMasked(dir, 'p1', total, late(), () => {}),
    SecureDataDiscardedError,
  );
  assert.equal(await maskedWordsHeld(dir, 'p1'), 0, 'the discard deleted the vector');
  // A stream that starts after the discard makes no file.
  await assert.rejects(
    appendMasked(dir, 'p2', total, of(piece(0, [1, 2], total)), () => {}),
    SecureDataDiscardedError,
  );
  assert.deepEqual(await readdir(secureDir(dir)), ['discarded'], 'nothing but the mark is left');
  // A second discard (a restart, a redelivered commit) finds nothing and leaves the mark as it is (not rewritten).
  const mark = await stat(join(secureDir(dir), 'discarded'));
  assert.equal(await discardSecureData(dir), false);
  assert.equal((await stat(join(secureDir(dir), 'discarded'))).ino, mark.ino);
});

test('a clipped count above |U| is refused before anything is written; the vector takes the right count after', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'masked-spool-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const total = 4;
  await appendMasked(dir, 'p1', total, of(piece(0, [1, 2], total)), () => {});
  // The chunk that ends the vector, with 5 values clipped of 4 positions: one value per word, so at most 4.
  const tooMany = { ...piece(2, [3, 4], total), clipped: 5n };
  await assert.rejects(
    appendMasked(dir, 'p1', total, of(tooMany), () => {}),
    InvalidArgumentError,
  );
  assert.equal(await maskedWordsHeld(dir, 'p1'), 2, 'no word of the refused chunk');
  assert.deepEqual(await readdir(join(secureDir(dir), 'masked')), ['p1.u32'], 'no count file');
  // Resumed with a count within |U|: the vector is whole and its count kept.
  assert.equal(await appendMasked(dir, 'p1', total, of({ ...piece(2, [3, 4], total), clipped: 4n }), () => {}), total);
  assert.deepEqual([...(await readMasked(dir, 'p1', 0, total))], [1, 2, 3, 4]);
  assert.equal(await maskedClipped(dir, 'p1'), 4);
});

test('a corrupt clipped-count file is an error naming the file, not a count of 0', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'masked-spool-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await appendMasked(dir, 'p1', 2, of({ ...piece(0, [1, 2], 2), clipped: 1n }), () => {});
  assert.equal(await maskedClipped(dir, 'p1'), 1);
  assert.equal(await maskedClipped(dir, 'p2'), 0, 'no file: nothing clipped');
  const file = join(secureDir(dir), 'masked', 'p1.clipped');
  for (const bad of ['', '1x', '-1', '1.5', '1e3', '\u0000\u0000']) {
    await writeFile(file, bad);
    await assert.rejects(
      maskedClipped(dir, 'p1'),
      (err: Error) => err.message.includes(file),
      `content ${JSON.stringify(bad)}`,
    );
  }
});
