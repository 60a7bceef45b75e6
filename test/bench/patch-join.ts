/**
 * The merged patch's join (PatchWriter.appendFile), read block size side by side: a 131 MB piece (the embedding's
 * size) copied behind a header, hashed and fsynced in the stream's default 64 KiB blocks and in JOIN_BLOCK_BYTES,
 * alternating; CPU and wall seconds per run. docs/performance.md, "Merged patch".
 *
 *   npx tsx test/bench/patch-join.ts [runs=6]
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { patchHeader } from '../../proto/patch/index.js';
import { JOIN_BLOCK_BYTES, PatchWriter } from '../../server/merge/patch-writer.js';
import { cpuSeconds as cpu } from './measure.js';

const runs = Number(process.argv[2] ?? 6);
const dir = await mkdtemp(join(tmpdir(), 'dppa-patch-join-'));
const piece = join(dir, 'piece');
const header = patchHeader('f'.repeat(64), [{ name: 'emb', shape: [32000, 2048], baseSha256: new Uint8Array(32) }]);

/** Joins the piece (past its 40-byte prefix) as the commit does, `blockBytes` at a time; returns [CPU s, wall s]. */
async function joinOnce(blockBytes: number): Promise<[number, number]> {
  const out = join(dir, 'joined');
  const c = cpu();
  const t = performance.now();
  const writer = await PatchWriter.create(out, header);
  await writer.appendFile(piece, 40, blockBytes);
  await writer.close();
  const result: [number, number] = [cpu() - c, (performance.now() - t) / 1000];
  await rm(out);
  return result;
}

try {
  await writeFile(piece, randomBytes(131_000_000));
  const rows: Record<string, number[][]> = { default_64k: [], join_block: [] };
  for (let i = 0; i < runs; i++) {
    rows.default_64k!.push(await joinOnce(64 * 1024));
    rows.join_block!.push(await joinOnce(JOIN_BLOCK_BYTES));
  }
  const fmt = (r: number[][]): string[] => r.map(([c, w]) => `${c!.toFixed(3)}/${w!.toFixed(3)}`);
  console.log(
    JSON.stringify({ cpu_wall_s: { default_64k: fmt(rows.default_64k!), join_block: fmt(rows.join_block!) } }),
  );
} finally {
  await rm(dir, { recursive: true, force: true });
}
