/**
 * Issue #16 goal 5: weights that land off their exact value after a merge over gRPC on loopback. A single-party
 * magnitude merge at rate 0 with factor 1 against the fine-tune, and a 3-party DP merge at 90% against exact task
 * arithmetic bf16(B + Σ_i (F_i − B) over each party's kept set, in fp32). Prints one JSON line.
 * `npx tsx test/bench/exact-values.ts`
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { assembleTensor } from '../../proto/sparse/index.js';
import {
  ADMIN,
  call,
  createJobRequest,
  pruneRecords,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from '../fixtures/grpc-harness.js';
import { roundBf16 } from '../fixtures/reference.js';
import { writeLlamaFamily } from '../fixtures/synthetic-model.js';

const SHAPE = { layers: 4, hidden: 128, intermediate: 344, vocab: 1000 };

/** Merges the parties' records in a job with factor 1 and returns the merged checkpoint's folder. */
async function merge(
  h: Harness,
  dataDir: string,
  base: string,
  method: string,
  rate: number,
  recs: DeltaRecord[][],
): Promise<string> {
  const parties = recs.map((_r, i) => `p${i}`);
  const { job, tokens } = await call(
    h.jobs,
    'createJob',
    createJobRequest({
      basePath: base,
      parties,
      rate,
      method,
      label: 'exact',
      dpa: { fixed: { factors: [1], perParty: {} }, scaleOutsideByMax: false },
    }),
    ADMIN,
  );
  await Promise.all(parties.map((p, i) => upload(h.uploads, tokens[p]!, uploadMessages(job!.id, p, recs[i]!))));
  for (;;) {
    const j = await call(h.jobs, 'getJob', { jobId: job!.id }, ADMIN);
    if (j.state === JobState.JOB_STATE_MERGED) break;
    if (j.state === JobState.JOB_STATE_FAILED) throw new Error(j.failureReason);
    await new Promise((r) => setTimeout(r, 50));
  }
  return join(dataDir, 'jobs', job!.id, 'merged');
}

/** Weights of `merged` that differ from bf16(B + Σ_i (F_i − B)|kept_i), all tensors and embeddings alone. */
async function differing(merged: string, base: string, fts: string[], recs: DeltaRecord[][]): Promise<number[]> {
  const [m, b] = await Promise.all([Checkpoint.open(merged), Checkpoint.open(base)]);
  const f = await Promise.all(fts.map((x) => Checkpoint.open(x)));
  let all = 0;
  let total = 0;
  let emb = 0;
  let embTotal = 0;
  for (const info of b.tensors()) {
    const bv = await b.readF32(info.name);
    const acc = Float32Array.from(bv);
    for (const [i, r] of recs.entries()) {
      const s = r.findIndex((x) => x.tensorBegin?.name === info.name);
      if (s < 0) continue;
      const e = r.findIndex((x, k) => k > s && x.tensorEnd !== undefined);
      const fv = await f[i]!.readF32(info.name);
      for (const part of assembleTensor(r.slice(s, e + 1)).partitions)
        for (const pos of part.positions) acc[pos] = acc[pos]! + Math.fround(fv[pos]! - bv[pos]!);
    }
    const got = await m.readF32(info.name);
    let d = 0;
    for (let i = 0; i < acc.length; i++) if (roundBf16(acc[i]!) !== got[i]) d++;
    all += d;
    total += acc.length;
    if (info.name.includes('embed')) {
      emb += d;
      embTotal += acc.length;
    }
  }
  await Promise.all([m.close(), b.close(), ...f.map((x) => x.close())]);
  return [all, total, emb, embTotal];
}

const dir = await mkdtemp(join(tmpdir(), 'dppa-exact-bench-'));
const h = await startHarness(join(dir, 'data'));
try {
  const one = await writeLlamaFamily(join(dir, 'one'), { shape: SHAPE, seed: 11 });
  const oneRecs = [
    await pruneRecords({ base: one.base, finetuned: one.finetuned[0]!, rate: 0, levels: [0], method: 'magnitude' }),
  ];
  const [single, singleTotal] = await differing(
    await merge(h, join(dir, 'data'), one.base, 'magnitude', 0, oneRecs),
    one.base,
    one.finetuned,
    oneRecs,
  );
  const three = await writeLlamaFamily(join(dir, 'three'), { shape: SHAPE, seed: 13, finetunes: 3 });
  const threeRecs = await Promise.all(
    three.finetuned.map((ft) => pruneRecords({ base: three.base, finetuned: ft, rate: 0.9, levels: [0.9] })),
  );
  const [multi, multiTotal, emb, embTotal] = await differing(
    await merge(h, join(dir, 'data'), three.base, 'dp', 0.9, threeRecs),
    three.base,
    three.finetuned,
    threeRecs,
  );
  console.log(
    JSON.stringify({
      single_party_rate0_differing: single,
      single_party_weights: singleTotal,
      three_party_differing: multi,
      three_party_weights: multiTotal,
      three_party_embedding_differing: emb,
      embedding_weights: embTotal,
    }),
  );
} finally {
  await h.close();
  await rm(dir, { recursive: true, force: true });
}
