/**
 * `npm run bench:prune`: DP prune of one LLaMA-7B-shaped block (q/k/v/o 4096×4096,
 * gate/up 11008×4096, down 4096×11008; bf16 files generated here) by `dppa prune`
 * against a numpy script doing the same work (test/bench/numpy-prune.py), both as
 * whole processes, run alternately; prints each round's times, the medians, the
 * time ratio to numpy within each round, CPU seconds and peak RSS, and as its
 * last line `{"dppa_s": …, "numpy_s": …}` (medians; dppa with 2 workers).
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

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    rate: { type: 'string', default: '0.9' },
    keep: { type: 'boolean' },
  },
});
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

const prune = (out: string, workers: string) => () =>
  measureProcess(
    process.execPath,
    [
      'bin/dppa.js',
      'prune',
      '--base',
      join(dir, 'base'),
      '--finetuned',
      join(dir, 'ft'),
      '--rate',
      rate,
      '--levels',
      rate,
      '--out',
      join(dir, out),
      '--workers',
      workers,
      '--overwrite',
    ],
    { cwd: root },
  );
// The machine's OpenBLAS hints (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) slow a current numpy; unset for the peer alone.
const numpyEnv = Object.fromEntries(
  Object.entries(process.env).filter(([k]) => k !== 'OPENBLAS_CORETYPE' && k !== 'OPENBLAS_L2_SIZE'),
);
const contenders = {
  'dppa (2 workers)': prune('out.dppa', '2'),
  'dppa (1 worker)': prune('out1.dppa', '1'),
  numpy: () =>
    measureProcess(
      'python3',
      [join(root, 'test/bench/numpy-prune.py'), join(dir, 'base'), join(dir, 'ft'), rate, join(dir, 'out.npz')],
      { cwd: root, env: numpyEnv },
    ),
};
type Run = ReturnType<typeof measureProcess>;
const results = new Map<string, Run[]>();
for (let i = 0; i < runs; i++) {
  for (const [name, run] of Object.entries(contenders)) {
    const r = run();
    results.set(name, [...(results.get(name) ?? []), r]);
    console.log(
      `run ${i + 1}/${runs} ${name.padEnd(17)} ${r.seconds.toFixed(2)} s, CPU ${r.cpuSeconds.toFixed(2)} s, peak RSS ${r.maxRssMiB.toFixed(0)} MiB`,
    );
  }
}
const numpyRuns = results.get('numpy')!;
const np = median(numpyRuns.map((r) => r.seconds));
console.log(`\nDP prune of one LLaMA-7B block (202M parameters, bf16) at rate ${rate}, median of ${runs}:`);
console.log(
  `${'contender'.padEnd(18)} ${'seconds'.padStart(8)} ${'CPU s'.padStart(7)} ${'time / numpy, per round'.padStart(26)} ${'peak RSS MiB'.padStart(13)}`,
);
for (const [name, rs] of results) {
  const perRound = rs.map((r, i) => (r.seconds / numpyRuns[i]!.seconds).toFixed(2)).join(' ');
  const s = median(rs.map((r) => r.seconds));
  const cpu = median(rs.map((r) => r.cpuSeconds));
  console.log(
    `${name.padEnd(18)} ${s.toFixed(2).padStart(8)} ${cpu.toFixed(2).padStart(7)} ${perRound.padStart(26)} ${Math.max(
      ...rs.map((r) => r.maxRssMiB),
    )
      .toFixed(0)
      .padStart(13)}`,
  );
}
console.log(
  '(time / numpy < 1 means faster than numpy; the largest tensor is 11008×4096 = 45M entries = 172 MiB in fp32)',
);
if (values.keep !== true) await rm(join(dir, 'out.npz'), { force: true });
console.log(
  JSON.stringify({
    dppa_s: Number(median(results.get('dppa (2 workers)')!.map((r) => r.seconds)).toFixed(3)),
    numpy_s: Number(np.toFixed(3)),
  }),
);
