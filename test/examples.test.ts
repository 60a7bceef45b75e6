/**
 * The runnable examples of docs/examples/ run as a reader would run them, each
 * against what it needs (files it generates, a real server). The others run
 * elsewhere: eval-harness.ts in dpa-cli.test.ts, nats-wait-merged.ts in
 * nats-events.test.ts, family-lab.ts (a module) in family-lab.test.ts; the
 * Python party in python-party.test.ts. Not run by the tests:
 * federated-demo.ts (`npm run demo`: about 15 s on an idle machine, 100 s on
 * this shared one, with no smaller setting) and repro.ts (`npm run repro`, 3-5
 * minutes); the functions they compute with are tested in family-lab.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState } from '../client/index.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { runTsx } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const example = (name: string): string => new URL(`../docs/examples/${name}`, import.meta.url).pathname;

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-examples-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('docs/examples', () => {
  it('prune-demo.ts prunes with DP and magnitude, plots and applies', async () => {
    const out = join(dir, 'prune-demo');
    const run = await runTsx(example('prune-demo.ts'), [out]);
    assert.equal(run.code, 0, run.stderr);
    // DP spreads the rate over the 28 linear layers by significance; magnitude prunes each at the rate.
    assert.match(run.stdout, /^2\/4 dp {8}at 0\.9: 28 linear layers, rates 0\.\d+\.\.0\.\d+, /m);
    assert.doesNotMatch(run.stdout, /^2\/4 dp {8}at 0\.9: 28 linear layers, rates 0\.9000\.\.0\.9000/m);
    assert.match(run.stdout, /^2\/4 magnitude at 0\.9: 28 linear layers, rates 0\.9000\.\.0\.9000, /m);
    assert.match(run.stdout, /^4\/4 applied: .*base\+dp \(\d+ tensors changed/m);
    for (const f of ['ft1-dp.dppa', 'ft1-magnitude.dppa', 'ft1-dp-rates.svg', 'base+dp/model.safetensors'])
      assert.ok(existsSync(join(out, f)), f);
  });

  describe('sdk-push.ts against a real server', () => {
    let h: Harness;
    let family: { base: string; finetuned: string[] };
    before(async () => {
      family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, finetunes: 2, seed: 3 });
      h = await startHarness(join(dir, 'server-data'));
    });
    after(async () => {
      await h.close();
    });

    it('creates a job, pushes two parties, watches it merge and pulls the merged checkpoint', async () => {
      const out = join(dir, 'sdk-push-merged');
      const run = await runTsx(
        example('sdk-push.ts'),
        [h.address, family.base, family.base, family.finetuned[0]!, family.finetuned[1]!, out],
        {
          env: { ...process.env, DPPA_ADMIN_TOKEN: ADMIN },
        },
      );
      assert.equal(run.code, 0, run.stderr);
      const jobId = /^job (\S+) created$/m.exec(run.stdout)?.[1];
      assert.ok(jobId !== undefined, run.stdout);
      assert.match(run.stdout, /^state → merged$/m);
      assert.match(run.stdout, /^merged checkpoint in .*: .*model\.safetensors/m);

      // The job merged with the example's factors, and what was pulled is a checkpoint of the base's tensors.
      const admin = new DppaClient({ address: h.address, token: ADMIN });
      try {
        const job = await admin.getJob(jobId);
        assert.equal(job.state, JobState.JOB_STATE_MERGED);
        for (const p of job.parties) assert.deepEqual(p.factors, [1.8, 1.2], p.name);
      } finally {
        admin.close();
      }
      const [base, merged] = await Promise.all([Checkpoint.open(family.base), Checkpoint.open(out)]);
      try {
        assert.deepEqual(
          merged
            .tensors()
            .map((t) => t.name)
            .sort(),
          base
            .tensors()
            .map((t) => t.name)
            .sort(),
        );
      } finally {
        await Promise.all([base.close(), merged.close()]);
      }
    });
  });
});
