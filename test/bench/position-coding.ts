/**
 * Size and speed of the sparse position coding.
 *
 *   npx tsx test/bench/position-coding.ts
 *
 * For random (Bernoulli) masks of density 0.01, 0.1 and 0.3 over 10M
 * positions, split into default-size chunks, prints:
 *   - bytes per kept position: the Golomb bit streams plus, per chunk, the
 *     wire size of first_position, count and golomb_m (tag + varint each) and
 *     of the positions field's tag and length prefix;
 *   - the entropy bound H(p)/p in bytes, which no coding of an i.i.d. mask beats;
 *   - throughput in M positions/s of the position coding alone (gap encode /
 *     decode), and of whole chunks (encodeChunks / decodeChunk: positions,
 *     BF16 values, CRC-32C);
 * then the CRC-32C alone over a 700 kB buffer (an upload message's size), in MB/s.
 * Each throughput is the median of 5 timed rounds after 2 warm-up rounds.
 * Prints figures only; asserts nothing.
 */

import { crc32c, decodeChunk, DEFAULT_MAX_CHUNK_ENTRIES, encodeChunks } from '../../proto/sparse/index.js';
import { decodeGaps, encodeGaps, golombParameter } from '../../proto/sparse/golomb.js';
import type { SparseChunk } from '../../proto/gen/dppa/v1/sparse.js';
import { uniform } from '../fixtures/synthetic-model.js';

const N = 10_000_000;
const DENSITIES = [0.01, 0.1, 0.3];
const WARMUP = 2;
const ROUNDS = 5;

function randomMask(n: number, density: number, seed: number): Float64Array {
  const rand = uniform(seed);
  const out = new Float64Array(Math.ceil(n * density * 1.1) + 64);
  let k = 0;
  for (let i = 0; i < n; i++) if (rand() < density) out[k++] = i;
  return out.slice(0, k);
}

function varintSize(v: number | bigint): number {
  let x = BigInt(v);
  let n = 1;
  while (x >= 0x80n) {
    x >>= 7n;
    n++;
  }
  return n;
}

/** Median wall time in ms of `fn` over the timed rounds. */
function time(fn: () => void): number {
  for (let i = 0; i < WARMUP; i++) fn();
  const ms: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const t0 = performance.now();
    fn();
    ms.push(performance.now() - t0);
  }
  ms.sort((a, b) => a - b);
  return ms[ROUNDS >> 1]!;
}

function entropyBytesPerPosition(p: number): number {
  const h = -p * Math.log2(p) - (1 - p) * Math.log2(1 - p);
  return h / p / 8;
}

interface Piece {
  start: number;
  end: number;
  m: number;
  bytes: Uint8Array;
}

const rows: string[][] = [
  [
    'density',
    'kept',
    'chunks',
    'bytes/pos',
    'H(p)/p',
    'ratio',
    'gaps enc M/s',
    'gaps dec M/s',
    'chunk enc M/s',
    'chunk dec M/s',
  ],
];

for (const [i, density] of DENSITIES.entries()) {
  const positions = randomMask(N, density, 1000 + i);
  const kept = positions.length;
  const values = new Float32Array(kept).map((_, k) => Math.sin(k) * 1e-3);

  const chunks: SparseChunk[] = [...encodeChunks('bench', 1, positions, values)];
  let bytes = 0;
  for (const c of chunks) {
    bytes += 1 + varintSize(c.firstPosition) + 1 + varintSize(c.count) + 1 + varintSize(c.golombM);
    bytes += 1 + varintSize(c.positions.length) + c.positions.length;
  }

  const pieces: Piece[] = [];
  for (let start = 0; start < kept; start += DEFAULT_MAX_CHUNK_ENTRIES) {
    const end = Math.min(start + DEFAULT_MAX_CHUNK_ENTRIES, kept);
    const m = golombParameter(end - start, positions[end - 1]! - positions[start]! + 1);
    pieces.push({ start, end, m, bytes: new Uint8Array(0) });
  }
  const gapEncodeMs = time(() => {
    for (const p of pieces) p.bytes = encodeGaps(positions, p.start, p.end, p.m);
  });
  const outs = pieces.map((p) => new Float64Array(p.end - p.start));
  const gapDecodeMs = time(() => {
    for (const [k, p] of pieces.entries()) {
      const out = outs[k]!;
      out[0] = positions[p.start]!;
      if (decodeGaps(p.bytes, p.m, out) !== 'ok') throw new Error('gap stream did not decode');
    }
  });
  const chunkEncodeMs = time(() => {
    for (const c of encodeChunks('bench', 1, positions, values)) void c;
  });
  const chunkDecodeMs = time(() => {
    for (const c of chunks) decodeChunk(c);
  });

  const mps = (ms: number): string => (kept / ms / 1000).toFixed(1);
  const perPos = bytes / kept;
  const bound = entropyBytesPerPosition(density);
  rows.push([
    String(density),
    String(kept),
    String(chunks.length),
    perPos.toFixed(4),
    bound.toFixed(4),
    (perPos / bound).toFixed(4),
    mps(gapEncodeMs),
    mps(gapDecodeMs),
    mps(chunkEncodeMs),
    mps(chunkDecodeMs),
  ]);
}

const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
console.log(`random masks over ${N} positions, ${DEFAULT_MAX_CHUNK_ENTRIES}-entry chunks, node ${process.version}`);
for (const r of rows) console.log(r.map((cell, c) => cell.padStart(widths[c]!)).join('  '));

const message = Uint8Array.from({ length: 700_000 }, (_, i) => (i * 2654435761) >>> 24);
const crcMs = time(() => {
  for (let i = 0; i < 100; i++) crc32c(message.subarray(i & 3));
});
console.log(`CRC-32C of a 700 kB buffer: ${((100 * message.length) / crcMs / 1000).toFixed(0)} MB/s`);
