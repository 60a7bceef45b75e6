/**
 * `npm run bench:secure`: the time of each phase of secure aggregation and the
 * bytes each party sends, for the bench:server model pruned at rate 0.9 with 3
 * parties, in one process. How supports and bytes are modelled: docs/performance.md.
 *
 *   npm run bench:secure [-- --layers 22 --rate 0.9 --parties 3 --threshold 2 --chunk 4194304 --words N]
 *
 *   --words N   mask only N words of U (a quick try; the byte figures stay those of the whole model)
 */
import { parseArgs } from 'node:util';
import {
  SecureAggregator,
  SecureParty,
  addInto,
  applyMasks,
  decodeSum,
  encodeFixed,
  fixedPoint,
  removeMasks,
  stepOf,
  sumErrorBound,
  type MaskKeys,
} from '../../proto/secure/index.js';
import { tinyLlama } from './tinyllama-inputs.js';

const { values: args } = parseArgs({
  options: {
    layers: { type: 'string', default: '22' },
    rate: { type: 'string', default: '0.9' },
    parties: { type: 'string', default: '3' },
    threshold: { type: 'string', default: '2' },
    chunk: { type: 'string', default: String(1 << 22) },
    words: { type: 'string' },
    bound: { type: 'string', default: '0.05' },
  },
});
const layers = Number(args.layers);
const rate = Number(args.rate);
const n = Number(args.parties);
const threshold = Number(args.threshold);
const chunk = Number(args.chunk);
const bound = Number(args.bound);

// Sizes from the model's shapes.
const model = tinyLlama(layers);
let linear = 0;
let dense = 0;
for (const t of model.tensors) {
  const numel = t.shape.reduce((a, b) => a * b, 1);
  if (t.layer >= 0 && t.shape.length === 2) linear += numel;
  else dense += numel;
}
const keptLinear = Math.round(linear * (1 - rate));
const kept = keptLinear + dense;
const unionLinear = Math.round(linear * (1 - rate ** n));
const union = dense + unionLinear;
const words = args.words === undefined ? union : Number(args.words);

/** Bytes per coded position of a mask of density p: the entropy bound plus the 0.8% the coding measured. */
const positionBytes = (p: number): number => ((-p * Math.log2(p) - (1 - p) * Math.log2(1 - p)) / p / 8) * 1.008;

const phases: Record<string, { wall: number; cpu: number }> = {};
function timed<T>(phase: string, f: () => T): T {
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const out = f();
  const entry = (phases[phase] ??= { wall: 0, cpu: 0 });
  entry.wall += (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  entry.cpu += (cpu.user + cpu.system) / 1e6;
  return out;
}

const job = { jobId: 'bench-secure', parties: n, threshold };
const fp = fixedPoint(bound, n);
const ids = Array.from({ length: n }, (_, i) => i + 1);

// Rounds 0 and 1.
const parties = timed('keys', () => ids.map((i) => SecureParty.create(job, i)));
const server = SecureAggregator.create(job);
const roster = timed('keys', () => {
  for (const p of parties) server.advertise(p.advertise());
  return server.closeKeys();
});
const outboxes = timed('shares', () => parties.map((p) => p.shareKeys(roster)));
timed('shares', () => {
  outboxes.forEach((boxes, i) => server.submitShares(i + 1, boxes));
  server.closeShares(words, { spooled: true });
  for (const p of parties) p.receiveShares(server.sharesFor(p.state.index));
});
const maskKeys: MaskKeys[] = parties.map((p) => p.maskKeys());

// Each party's values on U: nonzero on kept/union of the positions, reused chunk by chunk.
const templates = ids.map(() => {
  const v = new Float32Array(Math.min(chunk, words));
  for (let k = 0; k < v.length; k++) if (Math.random() < kept / union) v[k] = (Math.random() * 2 - 1) * bound;
  return v;
});
const plainTemplate = new Float64Array(templates[0]!.length);
for (const t of templates) for (let k = 0; k < t.length; k++) plainTemplate[k]! += t[k]!;

// Round 2 is masked chunk by chunk; the server's rounds 2 and 3 follow once the masks' keys are rebuilt.
for (const i of ids) server.recordMasked(i, words);
const request = server.closeMasked();
const responses = timed('reveal', () => parties.map((p) => p.unmask(request)));
const removal = timed('rebuild', () => {
  for (const r of responses) server.submitUnmask(r);
  return server.maskRemoval();
});

const maskSeconds = ids.map(() => 0);
let worst = 0;
const masked = ids.map(() => new Uint32Array(Math.min(chunk, words)));
const sum = new Uint32Array(Math.min(chunk, words));
const decoded = new Float64Array(Math.min(chunk, words));
for (let offset = 0; offset < words; offset += chunk) {
  const len = Math.min(chunk, words - offset);
  ids.forEach((i, j) => {
    const t0 = performance.now();
    const w = masked[j]!.subarray(0, len);
    timed('mask', () => {
      encodeFixed(templates[j]!.subarray(0, len), fp, w);
      applyMasks(w, maskKeys[j]!, offset);
    });
    maskSeconds[j]! += (performance.now() - t0) / 1000;
  });
  const s = sum.subarray(0, len);
  timed('sum', () => {
    s.fill(0);
    for (const m of masked) addInto(s, m.subarray(0, len));
  });
  timed('remove masks', () => removeMasks(s, removal, offset));
  const d = timed('decode', () => decodeSum(s, fp, decoded.subarray(0, len)));
  for (let k = 0; k < len; k++) worst = Math.max(worst, Math.abs(d[k]! - plainTemplate[k]!));
}
if (worst > sumErrorBound(fp)) throw new Error(`unmasked sum off by ${worst}, bound ${sumErrorBound(fp)}`);

// Bytes each party sends, and receives for U.
const boxBytes = outboxes[0]!.reduce((a, b) => a + b.box.length, 0);
const revealBytes = responses[0]!.selfSeedShares.length * 48 + responses[0]!.maskKeyShares.length * 48;
const positions = keptLinear * positionBytes(keptLinear / linear);
const secure = {
  positions: Math.round(positions),
  masked_words: 4 * union,
  keys_and_shares: 64 + boxBytes + revealBytes,
};
const secureTotal = secure.positions + secure.masked_words + secure.keys_and_shares;
const plain = Math.round(positions + 2 * kept);
const unionDownload = Math.round(unionLinear * positionBytes(unionLinear / linear));

const round = (x: number): number => Math.round(x * 1000) / 1000;
console.log(
  `model: ${layers} layers, ${model.params} parameters (${linear} in linear layers), rate ${rate}, ${n} parties, t = ${threshold}`,
);
console.log(
  `kept per party ${kept}, |U| ${union} (masked here: ${words} words), fixed point step 2^-${fp.scaleBits} = ${stepOf(fp)}, bound ${bound}`,
);
console.log(`largest error of the unmasked sum: ${worst} (bound n·step/2 = ${sumErrorBound(fp)})`);
for (const [phase, t] of Object.entries(phases))
  console.log(`${phase.padEnd(13)} ${t.wall.toFixed(3)} s wall, ${t.cpu.toFixed(3)} s CPU`);
console.log(
  `bytes per party: secure ${secureTotal} (${JSON.stringify(secure)}), plain sparse ${plain}, ratio ${(secureTotal / plain).toFixed(2)}; U to download ${unionDownload}`,
);
console.log(
  JSON.stringify({
    parties: n,
    threshold,
    kept_per_party: kept,
    union,
    masked_words: words,
    seconds: Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, round(v.wall)])),
    cpu_seconds: Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, round(v.cpu)])),
    mask_seconds_per_party: maskSeconds.map(round),
    bytes_per_party: {
      ...secure,
      total: secureTotal,
      plain_sparse: plain,
      ratio: round(secureTotal / plain),
      union_download: unionDownload,
    },
    max_error: worst,
    error_bound: sumErrorBound(fp),
  }),
);
