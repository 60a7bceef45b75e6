/**
 * `npx tsx test/bench/secure-union.ts [--parties 3]`: the server's build of a secure job's union U alone
 * (server/secure/union.ts `buildUnion`), on spooled positions-only support files of TinyLlama's largest shapes: the
 * embedding [32000, 2048] kept whole by every party (as `dppa prune` keeps outside tensors), and one MLP projection
 * [5632, 2048] at 10% per party, independently. The files are written to a temporary folder; the build runs in a
 * process of its own (`--build DIR`), which prints its wall and CPU seconds, its peak RSS (VmHWM) and the longest
 * stall of its event loop (a 50 ms timer's lateness) as one JSON line.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { OutsidePolicy, PruneMethod } from '../../proto/gen/dppa/v1/algorithm.js';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { DELTA_FORMAT_VERSION, DeltaFileWriter, TensorRecordStream } from '../../proto/sparse/index.js';
import { buildUnion } from '../../server/secure/union.js';
import { uniform } from '../fixtures/synthetic-model.js';

const { values } = parseArgs({ options: { parties: { type: 'string', default: '3' }, build: { type: 'string' } } });
const PARTIES = Number(values.parties);
const TENSORS = [
  { name: 'model.embed_tokens.weight', shape: [32000, 2048], linear: false, density: 1 },
  { name: 'model.layers.0.mlp.up_proj.weight', shape: [5632, 2048], linear: true, density: 0.1 },
];
const fileOf = (dir: string, party: number, t: number): string => join(dir, `${party}-${t}.dppa`);

/** Writes party `party`'s support of tensor `t` as the spool holds it (one tensor, positions only), 2^20 at a time. */
async function writeSupport(dir: string, party: number, t: number): Promise<void> {
  const { name, shape, linear, density } = TENSORS[t]!;
  const header: DeltaHeader = {
    formatVersion: DELTA_FORMAT_VERSION,
    baseFingerprint: 'bench',
    method: 'dp',
    rate: 0.9,
    levels: [0.9],
    options: {},
    valueDtype: ValueDtype.VALUE_DTYPE_NONE,
    tensors: [
      {
        name,
        shape: shape.map(BigInt),
        kind: linear ? TensorKind.TENSOR_KIND_LINEAR : TensorKind.TENSOR_KIND_OUTSIDE,
        layer: linear ? 0 : -1,
        levelRates: linear ? [0.9] : [],
        sent: true,
        baseSha256: new Uint8Array(0),
      },
    ],
    producer: 'test/bench/secure-union.ts',
    pruneMethod: PruneMethod.PRUNE_METHOD_DP,
    outside: OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED,
    valueKind: ValueKind.VALUE_KIND_UNSPECIFIED,
  };
  const none = new Float32Array(0);
  const partition = linear ? 1 : 0;
  const rand = uniform(1000 * party + t);
  const records = new TensorRecordStream(name, shape, { valueDtype: ValueDtype.VALUE_DTYPE_NONE });
  const w = await DeltaFileWriter.create(fileOf(dir, party, t));
  await w.write({ header });
  await w.write(records.begin());
  const piece = new Float64Array(1 << 20);
  let n = 0;
  const flush = async (): Promise<void> => {
    for (const r of records.chunks(partition, { positions: piece.subarray(0, n), values: none })) await w.write(r);
    n = 0;
  };
  for (let x = 0; x < shape[0]! * shape[1]!; x++) {
    if (density < 1 && rand() >= density) continue;
    piece[n++] = x;
    if (n === piece.length) await flush();
  }
  await flush();
  await w.write(records.end(partition + 1));
  await w.close();
}

if (values.build !== undefined) {
  const dir = values.build;
  const files = Array.from({ length: PARTIES }, (_, p) =>
    TENSORS.map((t, i) => ({ name: t.name, file: fileOf(dir, p, i) })),
  );
  let stall = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    stall = Math.max(stall, now - last - 50);
    last = now;
  }, 50);
  const cpu = process.cpuUsage();
  const start = performance.now();
  const u = await buildUnion(
    join(dir, 'job'),
    files,
    TENSORS.map((t) => t.name),
  );
  clearInterval(timer);
  const used = process.cpuUsage(cpu);
  const hwm = Number(/VmHWM:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
  console.log(
    JSON.stringify({
      parties: PARTIES,
      unionSize: u.size,
      seconds: Number(((performance.now() - start) / 1000).toFixed(2)),
      cpuSeconds: Number(((used.user + used.system) / 1e6).toFixed(2)),
      peakRssMiB: Math.round(hwm / 1024),
      longestStallMs: Math.round(stall),
    }),
  );
} else {
  const dir = await mkdtemp(join(tmpdir(), 'dppa-secure-union-'));
  try {
    for (let p = 0; p < PARTIES; p++) for (let t = 0; t < TENSORS.length; t++) await writeSupport(dir, p, t);
    const args = ['--import', 'tsx', new URL(import.meta.url).pathname, '--parties', String(PARTIES), '--build', dir];
    process.stdout.write(execFileSync(process.execPath, args, { encoding: 'utf8' }));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
