import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CheckpointMismatchError, inspectDelta, pruneToFile } from '../client/index.js';
import { dpOffsets, keptCount, rateAt } from '../client/prune/rates.js';
import {
  addTotals,
  magnitudeTotals,
  outliersAbove,
  outlierThreshold,
  significance,
} from '../client/prune/significance.js';
import { Checkpoint, f16ToF32, f32ToF16, writeCheckpoint, type TensorData } from '../proto/safetensors/index.js';
import { ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { readDeltaFile, readDeltaHeader, TensorAssembler } from '../proto/sparse/index.js';
import { referenceDelta, referenceTopK, roundBf16 } from './fixtures/reference.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
let ft: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-prune-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 3 });
  base = fam.base;
  ft = fam.finetuned[0]!;
});
after(() => rm(dir, { recursive: true, force: true }));

/** Every tensor of a .dppa file, decoded, by name. */
async function decodeAll(
  file: string,
): Promise<Map<string, { partitions: { positions: Float64Array; values: Float32Array }[] }>> {
  const out = new Map<string, { partitions: { positions: Float64Array; values: Float32Array }[] }>();
  let asm: TensorAssembler | undefined;
  for await (const r of readDeltaFile(file)) {
    if (r.header !== undefined) continue;
    if (r.tensorBegin !== undefined) asm = new TensorAssembler({ file });
    asm!.push(r);
    if (asm!.complete) {
      const res = asm!.result();
      out.set(res.name, { partitions: res.partitions });
      asm = undefined;
    }
  }
  return out;
}

describe('DP prune on a synthetic LLaMA checkpoint', () => {
  it('keeps exactly n − floor(Θn) per level, nested, equal to an independent top-k, values the fine-tuned bf16 weights', async () => {
    const out = join(dir, 'dp.dppa');
    const report = await pruneToFile({ base, finetuned: ft, rate: 0.7, out, workers: 1 });
    assert.deepEqual(report.levels, [0.9, 0.8, 0.7]);
    const summary = await inspectDelta(out);
    const decoded = await decodeAll(out);
    const header = await readDeltaHeader(out);
    assert.equal(header.valueKind, ValueKind.VALUE_KIND_FINETUNED, 'a bf16 checkpoint pruned with DP sends F');
    assert.equal(header.formatVersion, 2);
    const fine = await Checkpoint.open(ft);
    const linear = summary.tensors.filter((t) => t.kind === 'linear');
    assert.equal(linear.length, TINY.layers * 7);
    const rates = new Set(linear.map((t) => t.levelRates.at(-1)!.toFixed(6)));
    assert.ok(rates.size > 3, `DP should give different rates to different layers, got ${[...rates].join(', ')}`);
    for (const t of linear) {
      const delta = await referenceDelta(base, ft, t.name);
      const weights = await fine.readF32(t.name);
      const parts = decoded.get(t.name)!.partitions;
      assert.equal(parts.length, 4, 'partition 0 (empty) and 1..3');
      assert.equal(parts[0]!.positions.length, 0);
      let union: number[] = [];
      t.levelRates.forEach((rate, level) => {
        const part = parts[level + 1]!;
        union = union.concat([...part.positions]);
        const k = keptCount(t.numel, rate);
        assert.equal(union.length, k, `${t.name} level ${level}: kept count`);
        assert.deepEqual(
          union.slice().sort((a, b) => a - b),
          referenceTopK(delta, k),
          `${t.name} level ${level}: kept set`,
        );
        part.positions.forEach((pos, i) => assert.equal(part.values[i], weights[pos]));
      });
      const line = report.tensors.find((r) => r.name === t.name)!;
      assert.equal(line.kept, union.length);
      assert.deepEqual(
        line.keptPerPartition,
        parts.map((p) => p.positions.length),
      );
    }
    await fine.close();
  });

  it('sends deltas (format 1) for DARE, and where the precision does not hold the fine-tuned dtype', async () => {
    for (const [opts, precision] of [
      [{ method: 'dare' as const }, 'bf16'],
      [{ valueDtype: 'f16' as const }, 'f16'],
    ] as const) {
      const out = join(dir, `delta-${precision}.dppa`);
      await pruneToFile({ base, finetuned: ft, rate: 0, out, workers: 1, ...opts });
      const header = await readDeltaHeader(out);
      assert.equal(header.valueKind, ValueKind.VALUE_KIND_UNSPECIFIED, precision);
      assert.equal(header.formatVersion, 1);
      const name = 'model.embed_tokens.weight';
      const delta = await referenceDelta(base, ft, name);
      const part = (await decodeAll(out)).get(name)!.partitions[0]!;
      const round = precision === 'bf16' ? roundBf16 : (x: number) => f16ToF32(f32ToF16(Float32Array.of(x)))[0]!;
      part.positions.forEach((pos, i) => assert.equal(part.values[i], round(delta[pos]!)));
    }
  });

  it('gives byte-identical files with 1 and 2 workers, and across runs', async () => {
    const files = [join(dir, 'w1.dppa'), join(dir, 'w2.dppa'), join(dir, 'w2b.dppa')];
    await pruneToFile({ base, finetuned: ft, rate: 0.8, out: files[0]!, workers: 1 });
    await pruneToFile({ base, finetuned: ft, rate: 0.8, out: files[1]!, workers: 2 });
    await pruneToFile({ base, finetuned: ft, rate: 0.8, out: files[2]!, workers: 2 });
    const [a, b, c] = await Promise.all(files.map((f) => readFile(f)));
    assert.ok(a!.equals(b!), '1 vs 2 workers');
    assert.ok(b!.equals(c!), 'two runs');
  });

  it('keeps outside tensors dense by default (partition 0), or prunes / skips them', async () => {
    const dense = await inspectDelta(
      (await pruneToFile({ base, finetuned: ft, rate: 0.9, out: join(dir, 'o1.dppa') })).file,
    );
    const emb = dense.tensors.find((t) => t.name === 'model.embed_tokens.weight')!;
    assert.deepEqual(emb.keptPerPartition, [emb.numel]);
    const mag = await inspectDelta(
      (await pruneToFile({ base, finetuned: ft, rate: 0.9, outside: 'magnitude', out: join(dir, 'o2.dppa') })).file,
    );
    assert.deepEqual(
      [dense.outside, mag.outside, mag.method],
      ['dense', 'magnitude', 'dp'],
      'inspect reads the header enums',
    );
    const emb2 = mag.tensors.find((t) => t.name === 'model.embed_tokens.weight')!;
    assert.deepEqual(emb2.keptPerPartition, [keptCount(emb2.numel, 0.9)]);
    const norm2 = mag.tensors.find((t) => t.name === 'model.norm.weight')!;
    assert.deepEqual(norm2.keptPerPartition, [norm2.numel], '1-D tensors stay dense');
    const skip = await inspectDelta(
      (await pruneToFile({ base, finetuned: ft, rate: 0.9, outside: 'skip', out: join(dir, 'o3.dppa') })).file,
    );
    assert.equal(skip.tensors.filter((t) => t.kind === 'outside' && t.sent).length, 0);
    assert.deepEqual(skip.tensors.find((t) => t.name === 'lm_head.weight')!.keptPerPartition, []);
  });

  it('magnitude uses the level rates everywhere; OWL varies by layer only', async () => {
    const mag = await inspectDelta(
      (await pruneToFile({ base, finetuned: ft, rate: 0.8, method: 'magnitude', out: join(dir, 'm.dppa') })).file,
    );
    for (const t of mag.tensors.filter((x) => x.kind === 'linear')) assert.deepEqual(t.levelRates, [0.9, 0.8]);
    const owl = await inspectDelta(
      (await pruneToFile({ base, finetuned: ft, rate: 0.8, method: 'owl', out: join(dir, 'owl.dppa') })).file,
    );
    const byLayer = new Map<number, Set<number>>();
    for (const t of owl.tensors.filter((x) => x.kind === 'linear'))
      byLayer.set(t.layer, (byLayer.get(t.layer) ?? new Set()).add(t.levelRates.at(-1)!));
    for (const s of byLayer.values()) assert.equal(s.size, 1, 'one rate per model layer');
    const mean = [...byLayer.values()].reduce((a, s) => a + [...s][0]!, 0) / byLayer.size;
    assert.ok(Math.abs(mean - 0.8) < 1e-9, 'OWL rates centre on the target');
  });

  it('DARE is reproducible for a seed and differs across seeds', async () => {
    const a = await pruneToFile({ base, finetuned: ft, rate: 0.9, method: 'dare', seed: 5, out: join(dir, 'd1.dppa') });
    const b = await pruneToFile({
      base,
      finetuned: ft,
      rate: 0.9,
      method: 'dare',
      seed: 5,
      out: join(dir, 'd2.dppa'),
      workers: 1,
    });
    const c = await pruneToFile({ base, finetuned: ft, rate: 0.9, method: 'dare', seed: 6, out: join(dir, 'd3.dppa') });
    const [x, y, z] = await Promise.all([a.file, b.file, c.file].map((f) => readFile(f)));
    assert.ok(x!.equals(y!));
    assert.ok(!x!.equals(z!));
  });

  it("gives the rates of a full-delta computation when a block threshold falls below a tensor's candidates (read again)", async () => {
    // Layer 1's q_proj moves ten times more than its block: the block's threshold is
    // below half of q_proj's own, so its candidates do not cover it and it is read again.
    const loud = 'model.layers.1.self_attn.q_proj.weight';
    const [b, f] = await Promise.all([Checkpoint.open(base), Checkpoint.open(ft)]);
    const tensors: TensorData[] = [];
    const deltas = new Map<string, Float32Array>();
    for (const info of b.tensors()) {
      const bv = await b.readF32(info.name);
      const fv = await f.readF32(info.name);
      const scale = info.name === loud ? 10 : 1;
      const out = Float32Array.from(fv, (x, i) => bv[i]! + scale * (x - bv[i]!));
      tensors.push({ name: info.name, dtype: 'F32', shape: [...info.shape], data: new Uint8Array(out.buffer) });
      deltas.set(
        info.name,
        Float32Array.from(out, (x, i) => x - bv[i]!),
      );
    }
    await Promise.all([b.close(), f.close()]);
    const louder = join(dir, 'louder');
    await writeCheckpoint(louder, tensors);

    const out = join(dir, 'louder.dppa');
    await pruneToFile({ base, finetuned: louder, rate: 0.7, out, workers: 2 });
    const linear = (await inspectDelta(out)).tensors.filter((t) => t.kind === 'linear');

    // Reference: every statistic from a full scan of each delta.
    const stats = linear.map((t) => {
      const totals = magnitudeTotals(deltas.get(t.name)!);
      return {
        name: t.name,
        layer: t.layer,
        count: t.numel,
        totals,
        significance: significance(
          totals,
          outliersAbove(deltas.get(t.name)!, outlierThreshold(totals, 5)),
          'magnitude',
        ),
      };
    });
    const layerSig = new Map<number, number>();
    for (const layer of new Set(stats.map((s) => s.layer))) {
      const members = stats.filter((s) => s.layer === layer);
      const totals = addTotals(members.map((s) => s.totals));
      const threshold = outlierThreshold(totals, 5);
      const loudStats = members.find((s) => s.name === loud);
      if (loudStats !== undefined)
        assert.ok(threshold < outlierThreshold(loudStats.totals, 5) / 2, 'the case this test is about');
      layerSig.set(
        layer,
        significance(totals, addTotals(members.map((s) => outliersAbove(deltas.get(s.name)!, threshold))), 'magnitude'),
      );
    }
    const offsets = dpOffsets(layerSig, stats, 0.08);
    for (const t of linear) {
      assert.deepEqual(
        t.levelRates,
        [0.9, 0.8, 0.7].map((a) => rateAt(a, offsets.get(t.name)!.offset)),
        t.name,
      );
    }
  });

  it('reports layers whose rate reaches 1 (dropped whole)', async () => {
    const report = await pruneToFile({
      base,
      finetuned: ft,
      rate: 0.95,
      levels: [0.95],
      lambda: 0.2,
      out: join(dir, 'c.dppa'),
    });
    assert.ok(report.droppedWhole.length > 0);
    for (const name of report.droppedWhole) assert.equal(report.tensors.find((t) => t.name === name)!.kept, 0);
  });
});

describe('mismatched checkpoints', () => {
  it('lists shape differences and suggests truncate for a resized vocabulary', async () => {
    const fam = await writeLlamaFamily(join(dir, 'vocab'), { shape: TINY, seed: 3, extraVocab: 4 });
    await assert.rejects(
      pruneToFile({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.9, out: join(dir, 'v.dppa') }),
      (err: unknown) => {
        assert.ok(err instanceof CheckpointMismatchError);
        assert.match(err.message, /model\.embed_tokens\.weight: base \[40, 32\], fine-tuned \[44, 32\].*truncate/);
        assert.match(err.message, /lm_head\.weight/);
        return true;
      },
    );
    const report = await pruneToFile({
      base: fam.base,
      finetuned: fam.finetuned[0]!,
      rate: 0.9,
      vocabMismatch: 'truncate',
      out: join(dir, 'v.dppa'),
    });
    assert.deepEqual(report.truncated.sort(), ['lm_head.weight', 'model.embed_tokens.weight']);
    const delta = await inspectDelta(report.file);
    assert.deepEqual(delta.tensors.find((t) => t.name === 'lm_head.weight')!.shape, [40, 32]);
  });

  it('lists missing and extra tensors; no output file is left', async () => {
    const other = await writeLlamaFamily(join(dir, 'other'), { shape: { ...TINY, layers: 2 }, seed: 3 });
    const out = join(dir, 'x.dppa');
    await assert.rejects(
      pruneToFile({ base, finetuned: other.finetuned[0]!, rate: 0.9, out }),
      /missing in the fine-tuned model: model\.layers\.2\.self_attn\.q_proj\.weight/,
    );
    await assert.rejects(
      pruneToFile({ base: other.base, finetuned: ft, rate: 0.9, out }),
      /not in the base model: model\.layers\.2\./,
    );
    await assert.rejects(readFile(out), { code: 'ENOENT' });
  });

  it('rejects bad options by name', async () => {
    await assert.rejects(
      pruneToFile({ base, finetuned: ft, rate: 1, out: join(dir, 'y.dppa') }),
      /rate: must be in \[0, 1\)/,
    );
    await assert.rejects(
      pruneToFile({ base, finetuned: ft, rate: 0.8, levels: [0.9, 0.7], out: join(dir, 'y.dppa') }),
      /last level must be the target/,
    );
    await assert.rejects(
      pruneToFile({ base, finetuned: ft, rate: 0.8, layerPattern: 'layers\\.\\d+', out: join(dir, 'y.dppa') }),
      /capture group/,
    );
  });
});
