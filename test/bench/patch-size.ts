/**
 * The merged patch's size for TinyLlama's shapes at any depth, computed with the patch's own encoder
 * (`patchTensorRecords`) on random supports of a given union density (3 parties at 10%: 1 − 0.9³ = 0.271;
 * bench:server's DP supports measured 0.277), instead of running the whole benchmark. Prints one JSON line.
 *
 *   npx tsx test/bench/patch-size.ts [layers=22] [density=0.277]
 */
import { PatchSupport, patchTensorRecords } from '../../proto/patch/index.js';
import { rng } from '../fixtures/family/tasks.js';

const layers = Number(process.argv[2] ?? 22);
const density = Number(process.argv[3] ?? 0.277);
const [hidden, intermediate, vocab, kv] = [2048, 5632, 32000, 256];
const linear: [number, number][] = [
  [hidden, hidden],
  [kv, hidden],
  [kv, hidden],
  [hidden, hidden],
  [intermediate, hidden],
  [intermediate, hidden],
  [hidden, intermediate],
];
const whole: number[] = [vocab * hidden, vocab * hidden, hidden];
const perLayerWhole = [hidden, hidden];

const random = rng(12345);
const rand = (): number => random.next();

/** Bytes of one tensor's records in the patch. */
function tensorBytes(rows: number, cols: number, p: number): number {
  const numel = rows * cols;
  const support = new PatchSupport(numel, 't');
  const positions: number[] = [];
  if (p >= 1) support.add({ range: true, firstPosition: 0, count: numel } as never);
  else {
    for (let i = 0; i < numel; i++) if (rand() < p) positions.push(i);
    support.add({ range: false, positions: Float64Array.from(positions) } as never);
  }
  const acc = new Float32Array(numel).fill(0.01);
  let bytes = 0;
  for (const b of patchTensorRecords('model.layers.0.mlp.gate_proj.weight', [rows, cols], 'BF16', acc, support))
    bytes += b.length;
  return bytes;
}

const layerBytes =
  linear.reduce((a, [r, c]) => a + tensorBytes(r, c, density), 0) +
  perLayerWhole.reduce((a, n) => a + tensorBytes(1, n, 1), 0);
const wholeBytes = whole.reduce((a, n) => a + tensorBytes(1, n, 1), 0);
const params =
  whole.reduce((a, n) => a + n, 0) +
  layers * (linear.reduce((a, [r, c]) => a + r * c, 0) + perLayerWhole.reduce((a, n) => a + n, 0));
const patchBytes = wholeBytes + layers * layerBytes;
const denseBytes = params * 2;
console.log(
  JSON.stringify({
    layers,
    density,
    patch_bytes: patchBytes,
    dense_bytes: denseBytes,
    ratio: Number((patchBytes / denseBytes).toFixed(4)),
    per_layer_bytes: layerBytes,
    whole_bytes: wholeBytes,
  }),
);
