/**
 * Read throughput of the safetensors reader against `cat file > /dev/null`.
 *
 *   npx tsx test/bench/safetensors-read.ts [--size-gb 1]
 *
 * Writes a single-file BF16 checkpoint of 16 MiB tensors (4096×2048) into a
 * temp dir, then alternates cat, readRaw over all tensors and readF32 over
 * all tensors (fresh output, then one reused output array), 3 rounds, and
 * prints the median MB/s of each (MB = 10^6 bytes of the file) and its ratio
 * to cat. Prints figures only; asserts nothing.
 */

import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Checkpoint, CheckpointWriter, type CheckpointLayout } from '../../proto/safetensors/index.js';

const ROWS = 4096;
const COLS = 2048;
const TENSOR_BYTES = ROWS * COLS * 2;
const ROUNDS = 3;

async function generate(dir: string, count: number): Promise<string> {
  const layout: CheckpointLayout = {
    sharded: false,
    indexMetadata: undefined,
    files: [
      {
        fileName: 'model.safetensors',
        metadata: { format: 'pt' },
        tensors: Array.from({ length: count }, (_, i) => ({
          name: `model.layers.${i}.weight`,
          dtype: 'BF16' as const,
          shape: [ROWS, COLS],
        })),
      },
    ],
  };
  const data = new Uint8Array(TENSOR_BYTES);
  randomFillSync(data);
  const out = join(dir, 'ckpt');
  const w = await CheckpointWriter.create(out, layout);
  for (let i = 0; i < count; i++) {
    // Cheap per-tensor variation; the content itself does not affect read speed.
    data[0] = i & 0xff;
    await w.writeTensor(`model.layers.${i}.weight`, data);
  }
  await w.commit();
  return join(out, 'model.safetensors');
}

async function timeCat(file: string): Promise<number> {
  const t0 = performance.now();
  await new Promise<void>((resolve, reject) => {
    const p = spawn('sh', ['-c', 'cat "$1" > /dev/null', 'sh', file], { stdio: 'inherit' });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`cat exited with ${code}`))));
  });
  return performance.now() - t0;
}

type Mode = 'raw' | 'f32' | 'f32-into';

async function timeReader(file: string, mode: Mode): Promise<number> {
  const into = mode === 'f32-into' ? new Float32Array(ROWS * COLS) : undefined;
  const t0 = performance.now();
  const c = await Checkpoint.open(file);
  try {
    for (const t of c.tensors()) {
      if (mode === 'raw') await c.readRaw(t.name);
      else await c.readF32(t.name, into === undefined ? {} : { into });
    }
  } finally {
    await c.close();
  }
  return performance.now() - t0;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-gb': { type: 'string', default: '1' } } });
  const sizeGb = Number(values['size-gb']);
  if (!(sizeGb > 0)) throw new Error(`--size-gb must be a positive number, got ${values['size-gb']}`);
  const count = Math.max(1, Math.round((sizeGb * 2 ** 30) / TENSOR_BYTES));
  const dir = await mkdtemp(join(tmpdir(), 'dppa-bench-'));
  try {
    const g0 = performance.now();
    const file = await generate(dir, count);
    const bytes = (await stat(file)).size;
    const mb = bytes / 1e6;
    console.log(
      `checkpoint: ${count} BF16 tensors of ${ROWS}x${COLS}, ${(bytes / 2 ** 30).toFixed(2)} GiB, written in ${((performance.now() - g0) / 1000).toFixed(1)} s`,
    );
    console.log(
      'note: the file was just written and fits in RAM, so every run reads from the page cache (warm); this compares CPU/copy overhead, not disk speed.',
    );
    await timeCat(file); // warm-up, untimed
    const runs: Record<string, { run: () => Promise<number>; ms: number[] }> = {
      cat: { run: () => timeCat(file), ms: [] },
      readRaw: { run: () => timeReader(file, 'raw'), ms: [] },
      readF32: { run: () => timeReader(file, 'f32'), ms: [] },
      'readF32 into': { run: () => timeReader(file, 'f32-into'), ms: [] },
    };
    const rate = (ms: number): string => `${(mb / (ms / 1000)).toFixed(0)} MB/s`;
    for (let r = 0; r < ROUNDS; r++) {
      const line: string[] = [];
      for (const [label, m] of Object.entries(runs)) {
        m.ms.push(await m.run());
        line.push(`${label} ${rate(m.ms[r]!)}`);
      }
      console.log(`round ${r + 1}: ${line.join(', ')}`);
    }
    const cat = median(runs.cat!.ms);
    console.log(`median of ${ROUNDS} (MB = 10^6 bytes of the file read):`);
    for (const [label, m] of Object.entries(runs)) {
      console.log(`  ${label.padEnd(13)} ${rate(median(m.ms)).padStart(11)}  ${(cat / median(m.ms)).toFixed(2)}x cat`);
    }
    console.log('  readF32 writes twice the bytes it reads (F32 from BF16) into fresh memory each tensor;');
    console.log('  "readF32 into" reuses one output array ({ into }), which avoids faulting that memory in.');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
