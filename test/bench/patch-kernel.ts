/**
 * The merge kernel's share of the dense merge and of the merged patch, side by side in one process (CPU
 * seconds): per tensor, the accumulation both need (base read, three parties added in fp32), then either the
 * dense tensor (encoded, written, fsynced, SHA-256) or the patch piece (support, base hash, records, piece
 * written) and its join (copied behind a header, hashed, fsynced). TinyLlama's shapes: a 5632×2048 linear layer
 * (three random 10% supports) and the 32000×2048 embedding (sent whole by all three). docs/performance.md.
 *
 *   npx tsx test/bench/patch-kernel.ts [rounds=3]
 */
import { createHash } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { Checkpoint, encodeFromF32, writeCheckpoint } from '../../proto/safetensors/index.js';
import { DeltaFileWriter, tensorRecords } from '../../proto/sparse/index.js';
import { DELTA_FORMAT_VERSION } from '../../proto/sparse/delta-format.js';
import { patchHeader } from '../../proto/patch/index.js';
import { accumulateTensor, mergeTensorOutputs, type TensorTask } from '../../server/merge/tensor-merge.js';
import { createPieces, PIECE_PREFIX_BYTES } from '../../server/merge/patch-output.js';
import { PatchWriter } from '../../server/merge/patch-writer.js';
import { rng } from '../fixtures/family/tasks.js';
import { cpuSeconds } from './measure.js';

const rounds = Number(process.argv[2] ?? 3);
const dir = await mkdtemp(join(tmpdir(), 'dppa-patch-kernel-'));
const TENSORS = [
  { name: 'lin', shape: [5632, 2048], kind: TensorKind.TENSOR_KIND_LINEAR },
  { name: 'emb', shape: [32000, 2048], kind: TensorKind.TENSOR_KIND_OUTSIDE },
];

const random = rng(7);
const rand = (): number => random.next();
const cpu = cpuSeconds;

try {
  await writeCheckpoint(
    join(dir, 'base'),
    TENSORS.map((t) => {
      const n = t.shape[0]! * t.shape[1]!;
      const v = new Float32Array(n);
      for (let i = 0; i < n; i++) v[i] = (rand() - 0.5) * 0.1;
      return { name: t.name, dtype: 'BF16', shape: t.shape, data: encodeFromF32(v, 'BF16') };
    }),
  );
  const base = await Checkpoint.open(join(dir, 'base'));
  // Three parties' one-tensor spool files: 10% random positions of the linear layer (partition 1), the embedding whole.
  const spool = new Map<string, string[]>();
  for (const t of TENSORS) {
    const n = t.shape[0]! * t.shape[1]!;
    const files: string[] = [];
    for (let party = 0; party < 3; party++) {
      const linear = t.kind === TensorKind.TENSOR_KIND_LINEAR;
      const pos: number[] = [];
      for (let i = 0; i < n; i++) if (!linear || rand() < 0.1) pos.push(i);
      const values = Float32Array.from(pos, () => (rand() - 0.5) * 0.01);
      const header: DeltaHeader = {
        formatVersion: DELTA_FORMAT_VERSION,
        baseFingerprint: '',
        method: 'dp',
        rate: 0.9,
        levels: [0.9],
        options: {},
        valueDtype: ValueDtype.VALUE_DTYPE_BF16,
        tensors: [
          {
            name: t.name,
            shape: t.shape.map(BigInt),
            kind: t.kind,
            layer: linear ? 0 : -1,
            levelRates: [0.9],
            sent: true,
            baseSha256: new Uint8Array(0),
          },
        ],
        producer: 'bench',
        pruneMethod: 0,
        outside: 0,
        valueKind: ValueKind.VALUE_KIND_UNSPECIFIED,
      };
      const file = join(dir, `${t.name}.${party}.dppa`);
      const w = await DeltaFileWriter.create(file);
      await w.write({ header });
      const entries = { positions: Float64Array.from(pos), values };
      const empty = { positions: new Float64Array(0), values: new Float32Array(0) };
      for (const r of tensorRecords(t.name, t.shape, linear ? [empty, entries] : [entries], {
        valueDtype: ValueDtype.VALUE_DTYPE_BF16,
      }))
        await w.write(r);
      await w.close();
      files.push(file);
    }
    spool.set(t.name, files);
  }

  const task = (name: string): TensorTask => ({
    name,
    contributions: spool.get(name)!.map((file, i) => ({ party: `p${i}`, file, weight: 1 / 3, factors: [1] })),
    outsideByMax: false,
  });
  const results: Record<string, Record<string, number[]>> = {};
  const add = (tensor: string, what: string, s: number): void => {
    ((results[tensor] ??= {})[what] ??= []).push(Number(s.toFixed(3)));
  };
  for (let round = 0; round < rounds; round++) {
    for (const t of TENSORS) {
      const numel = t.shape[0]! * t.shape[1]!;
      const buffer = new Float32Array(numel);
      // The accumulation alone (what both outputs start with).
      let c = cpu();
      await accumulateTensor(base, task(t.name), buffer);
      add(t.name, 'accumulate', cpu() - c);
      // Dense: accumulate, encode, write, fsync, SHA-256 (the writer's and commit's work for this tensor).
      c = cpu();
      const { bytes } = await mergeTensorOutputs(base, task(t.name), buffer);
      const fh = await open(join(dir, 'dense.bin'), 'w');
      await fh.write(bytes);
      await fh.datasync();
      await fh.close();
      createHash('sha256').update(bytes).digest();
      add(t.name, 'dense', cpu() - c);
      // Patch: accumulate with support and base hash, records into the piece, then the join.
      const pieces = join(dir, `pieces-${round}-${t.name}`);
      await createPieces(pieces);
      c = cpu();
      await mergeTensorOutputs(base, { ...task(t.name), dense: false, patchPiece: { dir: pieces, index: 0 } }, buffer);
      const piece = cpu() - c;
      c = cpu();
      const out = join(dir, 'patch.dppa');
      const writer = await PatchWriter.create(
        out,
        patchHeader('f'.repeat(64), [{ name: t.name, shape: t.shape, baseSha256: new Uint8Array(32) }]),
      );
      await writer.appendFile(join(pieces, '0'), PIECE_PREFIX_BYTES);
      const info = await writer.close();
      const joined = cpu() - c;
      add(t.name, 'patch_piece', piece);
      add(t.name, 'patch_join', joined);
      add(t.name, 'patch', piece + joined);
      add(t.name, 'patch_mb', info.size / 1e6);
      await rm(pieces, { recursive: true, force: true });
    }
  }
  await base.close();
  console.log(JSON.stringify(results));
} finally {
  await rm(dir, { recursive: true, force: true });
}
