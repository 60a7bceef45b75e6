/**
 * Secure aggregation with dropouts, parties pushing with the SDK over real gRPC to an embedded server: five parties,
 * t = 3; one stops right after sending its shares (before its masked upload), one right after its masked upload
 * (before the unmask request). The job merges the sum of the four masked vectors, against the plain merge of those
 * four parties' scaled deltas.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState, type SecureProgress } from '../client/index.js';
import { scaledTensors } from '../client/secure/scaled-delta.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { assertMatchesPlain } from './fixtures/secure-expected.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';

const shape = { layers: 2, hidden: 32, intermediate: 64, vocab: 64 };
const PARTIES = ['p1', 'p2', 'p3', 'p4', 'p5'];
const CLIP = 1;
let dir: string;
let base: string;
let finetuned: string[];
let h: Harness;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-secure-drop-'));
  ({ base, finetuned } = await writeLlamaFamily(join(dir, 'family'), { shape, seed: 53, finetunes: 5 }));
  h = await startHarness(join(dir, 'data'), { mergeWorkers: 0 });
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

describe('secure aggregation with dropouts', () => {
  it('five parties, t = 3: one drops after its shares, one after its masked upload; the job merges the rest', async () => {
    const retry = { attempts: 5, initialDelayMs: 20, maxDelayMs: 200 };
    const admin = new DppaClient({ address: h.address, token: ADMIN, retry });
    try {
      const { job, tokens } = await admin.createJob({
        basePath: base,
        parties: PARTIES,
        rate: 0.8,
        // Each dropout costs one phase deadline; 30 s leaves room for a loaded machine to prune and upload in time.
        secure: { threshold: 3, clipBound: CLIP, phaseSeconds: 30 },
      });
      // p4 stops once its shares are sent; p5 once the server holds its masked vector.
      const dropAt: Record<string, SecureProgress['step']> = { p4: 'shares', p5: 'maskedComplete' };
      const results = await Promise.allSettled(
        PARTIES.map(async (party, i) => {
          const client = new DppaClient({ address: h.address, token: tokens[party]!, retry });
          const stop = new AbortController();
          try {
            return await client.push(
              {
                jobId: job.id,
                party,
                base,
                finetuned: finetuned[i]!,
                workers: 1,
                secure: { workDir: join(dir, `work-${party}`), pollMs: 100 },
              },
              {
                signal: stop.signal,
                onSecure: (p) => {
                  if (p.step === dropAt[party]) stop.abort(new Error(`${party} drops after ${p.step}`));
                },
              },
            );
          } finally {
            client.close();
          }
        }),
      );
      for (const [i, r] of results.entries()) {
        const party = PARTIES[i]!;
        if (party in dropAt) assert.equal(r.status, 'rejected', `${party} dropped`);
        else assert.equal(r.status, 'fulfilled', `${party}: ${r.status === 'rejected' ? String(r.reason) : ''}`);
      }
      const events = [];
      for await (const e of admin.watchJob(job.id)) events.push(e);
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      const closed = events.flatMap((e) => (e.securePhaseClosed === undefined ? [] : [e.securePhaseClosed]));
      assert.deepEqual(
        closed.map((c) => [c.parties, c.missing]),
        [
          [5, []],
          [5, []],
          [5, []],
          [4, ['p4']],
          [3, ['p5']],
        ],
      );

      // The sum is over U3 = p1, p2, p3, p5 (p5's vector is in; its seed comes from the others' shares).
      const out = join(dir, 'merged');
      await admin.pull({ jobId: job.id, out });
      const b = await Checkpoint.open(base);
      const plain = new Map<string, Float32Array>();
      try {
        for (const party of ['p1', 'p2', 'p3', 'p5']) {
          for await (const t of scaledTensors(join(dir, `work-${party}`, 'delta.dppa'), { factors: [1, 1] })) {
            const acc = plain.get(t.name) ?? (await b.readF32(t.name));
            for (let j = 0; j < t.positions.length; j++) acc[t.positions[j]!] = acc[t.positions[j]!]! + t.values[j]!;
            plain.set(t.name, acc);
          }
        }
      } finally {
        await b.close();
      }
      await assertMatchesPlain({
        base,
        merged: out,
        plain,
        clip: CLIP,
        partyCount: PARTIES.length,
        minIdentical: 0.999,
      });
    } finally {
      admin.close();
    }
  });
});
