import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { prepareKillTrials, runKillTrial, type KillTrials } from './fixtures/kill-trial.js';

// Seeds whose kill points are the server during an upload, the server during the merge, and a push
// (`npm run kill-trials` runs many more).
const SEEDS = { 'server-upload': 7, 'server-merge': 1, push: 2 } as const;

let dir: string;
let setup: KillTrials;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-kill-'));
  setup = await prepareKillTrials(dir);
});
after(() => rm(dir, { recursive: true, force: true }));

describe('SIGKILL at a random point', () => {
  for (const [point, seed] of Object.entries(SEEDS)) {
    it(`of ${point === 'push' ? 'a push' : `the server (${point.slice('server-'.length)})`}: the job merges bit-identically to an undisturbed run`, async () => {
      const r = await runKillTrial(setup, seed);
      assert.equal(r.point, point, 'the seed picks this kill point');
      assert.ok(r.identical, `merged files differ after a kill ${r.point} at ${r.at}`);
    });
  }
});
