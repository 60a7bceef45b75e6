// The merged patch on F16 and F32 bases: a real server merges two parties' deltas; the patch
// pulled and applied locally (`pull({ base })`) holds exactly the merge computed independently
// (test/fixtures/expected-merge.ts: fp32 sums, rounded to f16 from the definition), and equals the
// server's dense merge bit for bit (values of 2 and 4 bytes, copied as they are).
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState, MergeOutput, pruneToFile } from '../client/index.js';
import type { Dtype } from '../proto/safetensors/index.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const WEIGHTS = { math: 1, law: 0.5 };
const FACTORS = [1.5, 0.75];

let dir: string;
let h: Harness;
let admin: DppaClient;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-patch-dtypes-'));
  h = await startHarness(join(dir, 'data'));
  admin = new DppaClient({ address: h.address, token: ADMIN });
});
after(async () => {
  admin.close();
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

async function files(folder: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const name of (await readdir(folder)).sort()) out.set(name, await readFile(join(folder, name)));
  return out;
}

describe('merged patch of a 16-bit float and a 32-bit float base', () => {
  for (const dtype of ['F16', 'F32'] as Dtype[]) {
    it(`${dtype}: the applied patch equals the dense merge bit for bit`, async () => {
      const at = join(dir, dtype);
      const fam = await writeLlamaFamily(join(at, 'family'), { shape: TINY, seed: 41, finetunes: 2, dtype });
      const deltas = await Promise.all(
        fam.finetuned.map(
          async (ft, i) =>
            (await pruneToFile({ base: fam.base, finetuned: ft, rate: 0.8, out: join(at, `d${i}.dppa`) })).file,
        ),
      );
      const { job, tokens } = await admin.createJob({
        basePath: fam.base,
        parties: ['math', 'law'],
        rate: 0.8,
        dpa: { fixed: { factors: FACTORS, perParty: {} }, scaleOutsideByMax: false },
        merge: {
          weights: WEIGHTS,
          signElection: false,
          partiesMayDownload: false,
          output: MergeOutput.MERGE_OUTPUT_BOTH,
        },
      });
      for (const [i, party] of ['math', 'law'].entries()) {
        const c = new DppaClient({ address: h.address, token: tokens[party]! });
        try {
          await c.push({ jobId: job.id, party, delta: deltas[i]! });
        } finally {
          c.close();
        }
      }
      for await (const e of admin.watchJob(job.id)) void e;
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      await admin.pull({ jobId: job.id, out: join(at, 'dense') });
      await admin.pull({ jobId: job.id, out: join(at, 'applied'), base: fam.base });
      // The applied patch against an independent computation of the merge, then against the dense output.
      await assertMerged(fam.base, join(at, 'applied'), [
        { delta: deltas[0]!, weight: WEIGHTS.math, factors: FACTORS },
        { delta: deltas[1]!, weight: WEIGHTS.law, factors: FACTORS },
      ]);
      const dense = await files(join(at, 'dense'));
      assert.deepEqual(await files(join(at, 'applied')), dense);
      const merged = dense.get('model.safetensors')!;
      const st = JSON.parse(merged.subarray(8, 8 + Number(merged.readBigUInt64LE(0))).toString('utf8')) as Record<
        string,
        { dtype?: string }
      >;
      assert.ok(
        Object.entries(st).every(([k, v]) => k === '__metadata__' || v.dtype === dtype),
        `every tensor of the merge is ${dtype}`,
      );
      // The patch changed the base: the equality above is not that of two copies of the base.
      assert.notDeepEqual(await files(join(at, 'applied')), await files(fam.base));
    });
  }
});
