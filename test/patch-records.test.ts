// Units of the merged patch's production: the support's size limit is a FormatError naming the
// tensor; a tensor's records come as a lazy sequence of bounded blocks that frame the same records
// as a `.dppa` file (made as they are taken: a value changed meanwhile shows); the base tensor's
// SHA-256 is the same whatever order the read's pieces arrive in.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { FormatError } from '../proto/errors.js';
import { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { PATCH_BLOCK_BYTES, PatchSupport, patchTensorRecords } from '../proto/patch/patch-records.js';
import { OrderedHash } from '../server/merge/ordered-hash.js';

describe('merged patch records', () => {
  it('a tensor of 2^32 elements or more is a FormatError naming it', () => {
    assert.throws(
      () => new PatchSupport(2 ** 32, 'big.weight'),
      (err: unknown) => err instanceof FormatError && err.message.includes('big.weight'),
    );
  });

  it('marks a RANGE chunk by its count, not by the length of its (possibly longer, reused) values array', () => {
    const support = new PatchSupport(40, 't');
    support.add({ range: true, firstPosition: 3, count: 20, values: new Float32Array(32) } as never);
    const marked = [...Array(40).keys()].filter((p) => (support.bits[p >>> 3]! & (1 << (p & 7))) !== 0);
    assert.deepEqual(
      marked,
      [...Array(20).keys()].map((k) => 3 + k),
    );
  });

  it('yields bounded blocks one at a time, framing begin, chunks with the marked values, end', () => {
    // Records of about 12 MiB: the first block is made before the last positions are read.
    const numel = 9_000_000;
    const acc = new Float32Array(numel).map((_, i) => (i % 7) - 3);
    const support = new PatchSupport(numel, 't');
    // Every third position marked: a sparse (Golomb) tensor.
    const positions = Float64Array.from({ length: numel / 3 }, (_, k) => 3 * k);
    support.add({ range: false, positions, firstPosition: 0, count: positions.length } as never);
    const gen = patchTensorRecords('t', [numel], 'F32', acc, support);
    const first = gen.next();
    assert.equal(first.done, false, 'a first block before the rest are made');
    // Lazy: a value changed after the first block was made shows in a later block.
    const late = numel - 3;
    const lateValue = 1234.5;
    acc[late] = lateValue;
    const blocks = [first.value, ...gen];
    assert.ok(blocks.length > 1);
    const maxRecord = 262144 * 4 * 2 + 1024; // one chunk's values and positions, generously
    for (const b of blocks) assert.ok(b.length <= PATCH_BLOCK_BYTES + maxRecord, `block of ${b.length} bytes`);
    // Unframe: the records are a begin, chunks whose values are the marked accumulator values, an end.
    const all = Buffer.concat(blocks);
    const records: DeltaRecord[] = [];
    for (let at = 0; at < all.length;) {
      const n = all.readUInt32LE(at);
      records.push(DeltaRecord.decode(all.subarray(at + 4, at + 4 + n)));
      at += 4 + n;
    }
    assert.equal(records[0]!.tensorBegin?.name, 't');
    const end = records.at(-1)!.tensorEnd!;
    assert.equal(end.keptPerPartition[0], BigInt(numel / 3));
    let k = 0;
    for (const r of records.slice(1, -1)) {
      const c = r.chunk!;
      const v = new Float32Array(c.values.buffer.slice(c.values.byteOffset, c.values.byteOffset + c.values.length));
      for (const x of v) {
        const position = 3 * k++;
        assert.equal(x, position === late ? lateValue : (position % 7) - 3);
      }
    }
    assert.equal(k, numel / 3);
    assert.equal(end.chunkCount, records.length - 2);
  });
});

describe('OrderedHash', () => {
  it('gives the SHA-256 of the whole range for pieces in any order', () => {
    const bytes = new Uint8Array(10_000).map((_, i) => (i * 31) & 0xff);
    const cuts = [0, 1000, 1004, 5000, 9999, 10_000];
    const pieces = cuts.slice(0, -1).map((c, i) => [c, bytes.subarray(c, cuts[i + 1])] as const);
    const h = new OrderedHash(bytes.length);
    for (const i of [3, 0, 4, 2, 1]) {
      const [at, piece] = pieces[i]!;
      const copy = Uint8Array.from(piece);
      h.add(copy, at);
      copy.fill(0); // the caller reuses its buffer: early pieces must have been copied
    }
    assert.equal(Buffer.from(h.digest()).toString('hex'), createHash('sha256').update(bytes).digest('hex'));
  });

  it('refuses to give a digest with a piece missing', () => {
    const h = new OrderedHash(10);
    h.add(new Uint8Array(5), 5);
    assert.throws(() => h.digest(), /missing/);
  });
});
