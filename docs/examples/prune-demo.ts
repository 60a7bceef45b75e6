/**
 * Pruning on one machine, without a server: DP and magnitude at 90% on a generated LLaMA-shaped pair, a rate plot,
 * and the DP delta applied back. See docs/design/examples.md.
 *
 *   npx tsx docs/examples/prune-demo.ts [OUT_DIR]      (default ./dppa-prune-demo, replaced)
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { applyDelta, inspectDelta, pruneToFile, ratePlotSvg } from '../../client/index.js';
import { writeLlamaFamily } from '../../test/fixtures/synthetic-model.js';

const dir = process.argv[2] ?? 'dppa-prune-demo';
await rm(dir, { recursive: true, force: true });
console.log(`1/4 generating a base and a fine-tuned checkpoint (4 layers, hidden 256, bf16) in ${dir}/`);
const { base, finetuned } = await writeLlamaFamily(dir, {
  shape: { layers: 4, hidden: 256, intermediate: 688, vocab: 512 },
  seed: 7,
});

for (const method of ['dp', 'magnitude'] as const) {
  const out = join(dir, `ft1-${method}.dppa`);
  const started = Date.now();
  const report = await pruneToFile({ base, finetuned: finetuned[0]!, rate: 0.9, method, out });
  const linear = report.tensors.filter((t) => t.shape.length === 2 && t.name.includes('layers.'));
  const rates = linear.map((t) => t.rate);
  console.log(
    `2/4 ${method.padEnd(9)} at 0.9: ${linear.length} linear layers, rates ${Math.min(...rates).toFixed(4)}..${Math.max(...rates).toFixed(4)}, ` +
      `${report.fileBytes} bytes, ${Date.now() - started} ms`,
  );
}

const summary = await inspectDelta(join(dir, 'ft1-dp.dppa'));
const plot = join(dir, 'ft1-dp-rates.svg');
await writeFile(plot, ratePlotSvg(summary));
const kept = summary.tensors.reduce((a, t) => a + t.keptPerPartition.reduce((x, y) => x + y, 0), 0);
console.log(
  `3/4 inspected ft1-dp.dppa: ${kept} entries kept, ${(summary.fileBytes / kept).toFixed(2)} bytes each; rates plotted in ${plot}`,
);

const merged = await applyDelta({ base, delta: join(dir, 'ft1-dp.dppa'), out: join(dir, 'base+dp'), factors: [1.0] });
console.log(`4/4 applied: ${merged.out} (${merged.tensorsChanged} tensors changed, ${merged.tensorsCopied} copied)`);
console.log('\nSame with the CLI: npx dppa prune --help, npx dppa inspect --help, npx dppa apply --help');
