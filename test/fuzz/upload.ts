/**
 * `npm run fuzz`: the upload fuzzer (test/fixtures/upload-fuzz.ts) at length.
 *
 *   npm run fuzz -- [--count 10000] [--seed 1]
 *
 * Prints the answers per status code and per case, and the request rate;
 * exits non-zero (with the case, seed and request) at the first wrong answer
 * or if the final merge differs from the independent one.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { runUploadFuzz } from '../fixtures/upload-fuzz.js';

const { values } = parseArgs({
  options: { count: { type: 'string', default: '10000' }, seed: { type: 'string', default: '1' } },
});
const count = Number(values.count);
const seed = Number(values.seed);
if (!Number.isInteger(count) || count < 1)
  throw new RangeError(`--count: expected an integer ≥ 1, got ${values.count}`);
if (!Number.isInteger(seed)) throw new RangeError(`--seed: expected an integer, got ${values.seed}`);

const dir = await mkdtemp(join(tmpdir(), 'dppa-fuzz-'));
try {
  const step = Math.max(1, Math.floor(count / 10));
  const report = await runUploadFuzz({
    dir,
    seed,
    count,
    onProgress: (n) => n % step === 0 && console.log(`${n} / ${count}`),
  });
  console.log(
    `${report.requests} malformed uploads in ${report.seconds.toFixed(1)} s (${(report.requests / report.seconds).toFixed(0)}/s), seed ${seed}; every answer as expected; the merge of the valid deltas is bit-exact`,
  );
  console.log(`streams sent again while a cut stream still held the slot: ${report.slotWaits}`);
  console.log('answers by status:');
  for (const [code, n] of Object.entries(report.codes).sort()) console.log(`  ${code.padEnd(20)} ${n}`);
  console.log('uploads by case:');
  for (const [name, n] of Object.entries(report.cases).sort()) console.log(`  ${name.padEnd(42)} ${n}`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
