/**
 * `npm run bench:prune`: DP prune of one LLaMA-7B-shaped block (q/k/v/o 4096×4096,
 * gate/up 11008×4096, down 4096×11008; bf16 files generated here) by `dppa prune`
 * against a numpy script doing the same work (test/bench/numpy-prune.py), both as
 * whole processes, run alternately; prints medians, their ratio and peak RSS.
 * Prints figures only; it never fails on a time.
 *
 *   npm run bench:prune [-- --runs 3 --rate 0.9]
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { encodeFromF32, writeCheckpoint, type TensorData } from '../../proto/safetensors/index.js';
import { uniform } from '../fixtures/synthetic-model.js';
import { measureProcess, median } from './measure.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, rate: { type: 'string', default: '0.9' }, keep: { type: 'boolean' } } });
const runs = Number(values.runs);
const rate = values.rate;
const root = new URL('../..', import.meta.url).pathname;
const dir = join(root, '.bench', 'prune-block');

const shapes: [string, number[]][] = [
  ['self_attn.q_proj', [4096, 4096]],
  ['self_attn.k_proj', [4096, 4096]],
  ['self_attn.v_proj', [4096, 4096]],
  ['self_attn.o_proj', [4096, 4096]],
  ['mlp.gate_proj', [11008, 4096]],
  ['mlp.up_proj', [11008, 4096]],
  ['mlp.down_proj', [4096, 11008]],
];

async function generate(): Promise<void> {
  if (existsSync(join(dir, 'ft', 'model.safetensors'))) return;
  console.log(`generating ${dir} (2 × 405 MB bf16) …`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const r = uniform(42);
  const base: TensorData[] = [];
  const ft: TensorData[] = [];
  shapes.forEach(([name, shape], j) => {
    const n = shape[0]! * shape[1]!;
    const b = new Float32Array(n);
    const f = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      b[i] = (r() - 0.5) * 0.1;
      // Deltas of about 0.01 with 0.5% outliers whose size varies by projection.
      f[i] = b[i]! + (r() - 0.5) * 0.02 * (r() < 0.005 ? 4 + j : 1);
    }
    const full = `model.layers.0.${name}.weight`;
    base.push({ name: full, dtype: 'BF16', shape, data: encodeFromF32(b, 'BF16') });
    ft.push({ name: full, dtype: 'BF16', shape, data: encodeFromF32(f, 'BF16') });
  });
  await writeCheckpoint(join(dir, 'base'), base);
  await writeCheckpoint(join(dir, 'ft'), ft);
}

await generate();
console.log('building dist/ …');
execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });

const contenders = {
  'dppa (2 workers)': () => measureProcess(process.execPath, ['bin/dppa.js', 'prune', '--base', join(dir, 'base'), '--finetuned', join(dir, 'ft'), '--rate', rate, '--levels', rate, '--out', join(dir, 'out.dppa'), '--workers', '2'], { cwd: root }),
  'dppa (1 worker)': () => measureProcess(process.execPath, ['bin/dppa.js', 'prune', '--base', join(dir, 'base'), '--finetuned', join(dir, 'ft'), '--rate', rate, '--levels', rate, '--out', join(dir, 'out1.dppa'), '--workers', '1'], { cwd: root }),
  numpy: () => measureProcess('python3', [join(root, 'test/bench/numpy-prune.py'), join(dir, 'base'), join(dir, 'ft'), rate, join(dir, 'out.npz')], { cwd: root }),
};
const results = new Map<string, { seconds: number; maxRssMiB: number }[]>();
for (let i = 0; i < runs; i++) {
  for (const [name, run] of Object.entries(contenders)) {
    const r = run();
    results.set(name, [...(results.get(name) ?? []), r]);
    console.log(`run ${i + 1}/${runs} ${name.padEnd(17)} ${r.seconds.toFixed(2)} s, peak RSS ${r.maxRssMiB.toFixed(0)} MiB`);
  }
}
const np = median(results.get('numpy')!.map((r) => r.seconds));
console.log(`\nDP prune of one LLaMA-7B block (202M parameters, bf16) at rate ${rate}, median of ${runs}:`);
console.log(`${'contender'.padEnd(18)} ${'seconds'.padStart(8)} ${'vs numpy'.padStart(9)} ${'peak RSS MiB'.padStart(13)}`);
for (const [name, rs] of results) {
  const s = median(rs.map((r) => r.seconds));
  console.log(`${name.padEnd(18)} ${s.toFixed(2).padStart(8)} ${(np / s).toFixed(2).padStart(8)}x ${Math.max(...rs.map((r) => r.maxRssMiB)).toFixed(0).padStart(13)}`);
}
console.log('(vs numpy > 1 means faster than numpy; the largest tensor is 11008×4096 = 45M entries = 172 MiB in fp32)');
if (values.keep !== true) await rm(join(dir, 'out.npz'), { force: true });
