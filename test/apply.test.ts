import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { applyDelta, pruneToFile } from '../client/index.js';
import { keptCount } from '../client/prune/rates.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { referenceDelta, referenceTopK, roundBf16 } from './fixtures/reference.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
let ft: string;
let delta: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-apply-'));
  // Sharded, so that the output must mirror a multi-file layout.
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 9, shardBytes: 8000 });
  base = fam.base;
  ft = fam.finetuned[0]!;
  delta = (await pruneToFile({ base, finetuned: ft, rate: 0.8, method: 'magnitude', out: join(dir, 'm.dppa') })).file;
});
after(() => rm(dir, { recursive: true, force: true }));

describe('apply', () => {
  it('equals base + Σ f_p · masked delta (fp32 F − B: the file carries F) computed independently, bit for bit in bf16', async () => {
    const out = join(dir, 'applied');
    const factors = [1.5, 0.75];
    await applyDelta({ base, delta, out, factors, scale: 2 });
    const b = await Checkpoint.open(base);
    const o = await Checkpoint.open(out);
    try {
      assert.deepEqual(
        o.layout.files.map((f) => f.fileName),
        b.layout.files.map((f) => f.fileName),
      );
      assert.ok(b.layout.files.length > 1, 'the fixture is sharded');
      for (const info of b.tensors()) {
        const bv = await b.readF32(info.name);
        const d = await referenceDelta(base, ft, info.name);
        const expected = Float32Array.from(bv);
        const linear = info.shape.length === 2 && info.name.includes('layers.');
        if (linear) {
          const k1 = referenceTopK(d, keptCount(info.numel, 0.9));
          const k2 = new Set(referenceTopK(d, keptCount(info.numel, 0.8)));
          const first = new Set(k1);
          for (const pos of k2) expected[pos] = expected[pos]! + 2 * (first.has(pos) ? 1.5 : 0.75) * d[pos]!;
        } else {
          for (let i = 0; i < d.length; i++) expected[i] = expected[i]! + 2 * d[i]!;
        }
        const want = new Uint16Array(expected.length);
        expected.forEach((x, i) => (want[i] = new Uint32Array(new Float32Array([roundBf16(x)]).buffer)[0]! >>> 16));
        const got = await o.readRaw(info.name);
        assert.deepEqual(new Uint16Array(got.buffer, got.byteOffset, got.length / 2), want, info.name);
      }
    } finally {
      await Promise.all([b.close(), o.close()]);
    }
    assert.deepEqual((await readdir(out)).filter((f) => !f.endsWith('.safetensors')).sort(), [
      'config.json',
      'model.safetensors.index.json',
      'tokenizer.json',
    ]);
  });

  it('rejects a factor list that does not match the partitions, leaving nothing', async () => {
    const out = join(dir, 'bad-factors');
    await assert.rejects(applyDelta({ base, delta, out, factors: [1] }), /2 partition\(s\).*got 1 factor/);
    await assert.rejects(readdir(out), { code: 'ENOENT' });
  });

  it('rejects a delta made against another base', async () => {
    const other = await writeLlamaFamily(join(dir, 'other'), { shape: TINY, seed: 10 });
    const out = join(dir, 'other-out');
    await assert.rejects(applyDelta({ base: other.base, delta, out }), /made against another base/);
    await assert.rejects(readdir(out), { code: 'ENOENT' });
  });

  it('rejects a damaged delta file naming it, leaving nothing', async () => {
    const bytes = await readFile(delta);
    bytes[Math.floor(bytes.length / 2)]! ^= 0xff;
    const damaged = join(dir, 'damaged.dppa');
    await writeFile(damaged, bytes);
    const out = join(dir, 'damaged-out');
    await assert.rejects(applyDelta({ base, delta: damaged, out }), (err: Error) =>
      err.message.includes('damaged.dppa'),
    );
    await assert.rejects(readdir(out), { code: 'ENOENT' });
  });
});
