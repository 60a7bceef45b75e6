/**
 * `npm run kill-trials -- [--trials N] [--seed S]`: N kill trials
 * (test/fixtures/kill-trial.ts) with seeds S, S+1, …: each SIGKILLs the
 * server during an upload or a merge, or a push, at a random point, brings it
 * back and checks that the job merges to the bytes of an undisturbed run.
 * Prints one line per trial and a summary; exits 1 if any trial differs.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { prepareKillTrials, runKillTrial, type TrialResult } from '../fixtures/kill-trial.js';

const { values } = parseArgs({
  options: { trials: { type: 'string', default: '20' }, seed: { type: 'string', default: '1' } },
});
const trials = Number(values.trials);
const first = Number(values.seed);
if (!Number.isInteger(trials) || trials < 1 || !Number.isInteger(first))
  throw new RangeError('--trials must be a positive integer and --seed an integer');

const dir = await mkdtemp(join(tmpdir(), 'dppa-kill-trials-'));
try {
  const setup = await prepareKillTrials(dir);
  console.log(`undisturbed run: ${setup.reference.length} merged files, merge ${setup.mergeSeconds.toFixed(2)} s`);
  const results: TrialResult[] = [];
  for (let seed = first; seed < first + trials; seed++) {
    const r = await runKillTrial(setup, seed);
    results.push(r);
    console.log(
      `trial seed ${r.seed}: kill ${r.point} at ${r.at}: ${r.identical ? 'bit-identical' : 'DIFFERENT'} (${r.seconds.toFixed(1)} s)`,
    );
  }
  const same = results.filter((r) => r.identical).length;
  const by = (p: string): number => results.filter((r) => r.point === p).length;
  console.log(
    `${same}/${results.length} trials merged bit-identically (server-upload ${by('server-upload')}, server-merge ${by('server-merge')}, push ${by('push')})`,
  );
  if (same !== results.length) process.exitCode = 1;
} finally {
  await rm(dir, { recursive: true, force: true });
}
