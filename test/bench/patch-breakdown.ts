/**
 * Where a merged patch's bytes go: position bytes and values of the sparse
 * (Golomb) chunks, values of the whole (RANGE) tensors, and the rest (headers,
 * framing). Prints one JSON line. Used on the patch a `bench:server --keep` run leaves.
 *
 *   npx tsx test/bench/patch-breakdown.ts .bench/server/run/data/jobs/<job>/merged-patch.dppa
 */
import { statSync } from 'node:fs';
import { PositionCoding } from '../../proto/gen/dppa/v1/sparse.js';
import { readDeltaFile } from '../../proto/sparse/index.js';

const file = process.argv[2];
if (file === undefined) throw new Error('usage: patch-breakdown.ts PATCH.dppa');
let positions = 0;
let sparseValues = 0;
let wholeValues = 0;
let sparseEntries = 0;
const whole = new Set<string>();
const numel = new Map<string, number>();
for await (const r of readDeltaFile(file)) {
  for (const t of r.header?.tensors ?? [])
    numel.set(
      t.name,
      t.shape.reduce((a, d) => a * Number(d), 1),
    );
  const c = r.chunk;
  if (c === undefined) continue;
  if (c.positionCoding === PositionCoding.POSITION_CODING_RANGE) {
    wholeValues += c.values.length;
    whole.add(c.tensor);
  } else {
    positions += c.positions.length;
    sparseValues += c.values.length;
    sparseEntries += c.count;
  }
}
let sparseElements = 0;
for (const [name, n] of numel) if (!whole.has(name)) sparseElements += n;
const size = statSync(file).size;
console.log(
  JSON.stringify({
    size,
    positions,
    sparseValues,
    wholeValues,
    rest: size - positions - sparseValues - wholeValues,
    sparseEntries,
    density: sparseEntries / sparseElements,
    positionBitsPerEntry: (8 * positions) / sparseEntries,
    wholeTensors: [...whole],
  }),
);
