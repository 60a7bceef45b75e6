/**
 * `npm run demo`: the whole federated merge on the embedded default, on one machine, no outside service.
 *
 * 1. generates a small LLaMA-shaped base and three fine-tunes ("math", "finance", "law");
 * 2. starts an aggregation server in this process (data under dppa-demo/server-data);
 * 3. creates a job (DP at 90%, fixed amplification factors);
 * 4. runs the three parties as separate `dppa push` processes, each pruning its own delta and uploading it;
 * 5. watches the job merge, pulls the merged checkpoint and checks its digests;
 * 6. prints what crossed the wire against what a dense exchange would have sent.
 *
 *   npm run demo [-- OUT_DIR]
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { DppaClient, JobState, jobStateName } from '../../client/index.js';
import { createLogger } from '../../server/log.js';
import { DppaServer } from '../../server/server.js';
import { writeLlamaFamily } from '../../test/fixtures/synthetic-model.js';

const dir = process.argv[2] ?? 'dppa-demo';
const root = new URL('../..', import.meta.url).pathname;
const parties = ['math', 'finance', 'law'];
const step = (n: number, text: string): void => console.log(`[${n}/6] ${text}`);

await rm(dir, { recursive: true, force: true });
step(1, `generating a base and three fine-tunes (6 layers, hidden 256, bf16) in ${dir}/`);
const { base, finetuned } = await writeLlamaFamily(join(dir, 'models'), { shape: { layers: 6, hidden: 256, intermediate: 688, vocab: 2048 }, seed: 7, finetunes: 3 });

const adminToken = randomBytes(24).toString('base64url');
const server = new DppaServer({ adminToken, dataDir: join(dir, 'server-data'), grpcPort: 0, metricsPort: 0, logger: createLogger({ level: 'warn' }) });
await server.start();
const address = `127.0.0.1:${server.grpcPort}`;
step(2, `aggregation server on ${address}, metrics on http://127.0.0.1:${server.metricsPort}/metrics`);

const admin = new DppaClient({ address, token: adminToken });
try {
  const { job, tokens } = await admin.createJob({
    basePath: base,
    parties,
    rate: 0.9,
    method: 'dp',
    dpa: { fixed: { factors: [1.5], perParty: {} }, scaleOutsideByMax: false },
    label: 'demo',
  });
  step(3, `job ${job.id}: DP at rate 0.9, amplification factor 1.5, parties ${parties.join(', ')}`);

  step(4, 'three parties prune and push their deltas, each in its own process');
  const started = Date.now();
  await Promise.all(
    parties.map(
      (party, i) =>
        new Promise<void>((resolve, reject) => {
          const child = spawn(
            process.execPath,
            ['--import', 'tsx', join(root, 'client/cli/main.ts'), 'push', '--server', address, '--job', job.id, '--party', party, '--base', base, '--finetuned', finetuned[i]!, '--workers', '1', '--json'],
            { env: { ...process.env, DPPA_TOKEN: tokens[party] }, stdio: ['ignore', 'pipe', 'inherit'] },
          );
          child.once('exit', (code) => {
            if (code !== 0) return reject(new Error(`dppa push for ${party} exited with ${code}`));
            console.log(`      ${party.padEnd(8)} uploaded (${((Date.now() - started) / 1000).toFixed(1)} s)`);
            resolve();
          });
        }),
    ),
  );

  for await (const e of admin.watchJob(job.id)) {
    if (e.stateChanged !== undefined) console.log(`      job ${jobStateName(e.stateChanged.from)} → ${jobStateName(e.stateChanged.to)}`);
    if (e.merged !== undefined) console.log(`      merged in ${e.merged.seconds.toFixed(2)} s: ${e.merged.files.join(', ')}`);
    if (e.failed !== undefined) throw new Error(`the job failed: ${e.failed.reason}`);
  }
  const final = await admin.getJob(job.id);
  if (final.state !== JobState.JOB_STATE_MERGED) throw new Error(`the job ended ${jobStateName(final.state)}: ${final.failureReason}`);

  const out = join(dir, 'merged');
  const pulled = await admin.pull({ jobId: job.id, out });
  step(5, `pulled the merged checkpoint into ${out}/ (${pulled.files.length} files, SHA-256 checked)`);

  const uploaded = final.parties.reduce((a, p) => a + Number(p.bytesReceived), 0);
  const dense = (await stat(join(base, 'model.safetensors'))).size * parties.length;
  step(6, `the parties sent ${(uploaded / 1e6).toFixed(1)} MB in all, against ${(dense / 1e6).toFixed(1)} MB for their dense fine-tuned weights (${(dense / uploaded).toFixed(1)}× less)`);
  console.log('\nNext: npx dppa serve --help, npx dppa push --help; docs/server.md and docs/sdk.md.');
} finally {
  admin.close();
  await server.stop();
}
