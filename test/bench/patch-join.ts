/**
 * The merged patch's join, read block size side by side: a 131 MB piece (the embedding's size) copied behind a
 * header, hashed and fsynced with the stream's default 64 KiB blocks and with JOIN_BLOCK_BYTES, alternating; CPU
 * and wall seconds per run. docs/performance.md, "Merged patch".
 *
 *   npx tsx test/bench/patch-join.ts [runs=6]
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { JOIN_BLOCK_BYTES } from '../../server/merge/patch-writer.js';

const runs = Number(process.argv[2] ?? 6);
const dir = await mkdtemp(join(tmpdir(), 'dppa-patch-join-'));
const piece = join(dir, 'piece');
const cpu = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** Copies the piece (past its 40-byte prefix) as the commit does; returns [CPU s, wall s]. */
async function joinOnce(highWaterMark: number | undefined): Promise<[number, number]> {
  const out = join(dir, 'joined');
  const fh = await open(out, 'w');
  const hash = createHash('sha256');
  const c = cpu();
  const t = performance.now();
  const opts = highWaterMark === undefined ? { start: 40 } : { start: 40, highWaterMark };
  for await (const block of createReadStream(piece, opts)) {
    const b = block as Buffer;
    hash.update(b);
    for (let done = 0; done < b.length;) done += (await fh.write(b, done)).bytesWritten;
  }
  await fh.sync();
  await fh.close();
  hash.digest();
  const result: [number, number] = [cpu() - c, (performance.now() - t) / 1000];
  await rm(out);
  return result;
}

try {
  await writeFile(piece, randomBytes(131_000_000));
  const rows: Record<string, number[][]> = { default_64k: [], join_block: [] };
  for (let i = 0; i < runs; i++) {
    rows.default_64k!.push(await joinOnce(undefined));
    rows.join_block!.push(await joinOnce(JOIN_BLOCK_BYTES));
  }
  const fmt = (r: number[][]): string[] => r.map(([c, w]) => `${c!.toFixed(3)}/${w!.toFixed(3)}`);
  console.log(
    JSON.stringify({ cpu_wall_s: { default_64k: fmt(rows.default_64k!), join_block: fmt(rows.join_block!) } }),
  );
} finally {
  await rm(dir, { recursive: true, force: true });
}
