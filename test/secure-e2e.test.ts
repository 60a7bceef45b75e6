/**
 * Secure aggregation end to end with real processes: a `dppa serve` process, a job made with
 * `dppa job create --privacy secure`, three parties pushing with the `dppa push` CLI (one searching its factors
 * locally with an --eval-cmd process, one killed mid-way and run again), and the merged checkpoint against the
 * plain merge of the deltas F − B formed from the checkpoints at each party's kept positions, scaled by the factors
 * each party chose (read from its own state file).
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { applyDelta, DppaClient, JobState, pruneToFile } from '../client/index.js';
import { shellQuote } from '../client/cli/eval-command.js';
import { loadParty } from '../client/secure/party-store.js';
import { freePort } from './fixtures/free-port.js';
import { assertMatchesPlainMerge, pushedParty } from './fixtures/secure-expected.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';

const ADMIN = 'e2e-secure-admin-token-0123456789';
const root = new URL('..', import.meta.url).pathname;
const shape = { layers: 2, hidden: 64, intermediate: 128, vocab: 256 };
const parties = ['math', 'finance', 'law'] as const;
const CLIP = 1;

let dir: string;
let base: string;
let finetuned: string[];
let port: number;
let server: ChildProcess | undefined;

function startServer(): Promise<ChildProcess> {
  const child = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      join(root, 'test/fixtures/serve-cli.ts'),
      'serve',
      '--data',
      join(dir, 'data'),
      '--grpc-port',
      String(port),
      '--metrics-port',
      '0',
    ],
    { env: { ...process.env, DPPA_ADMIN_TOKEN: ADMIN }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let err = '';
  child.stdout.resume();
  return new Promise((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
      if (err.includes('grpc listening on')) resolve(child);
    });
    child.once('exit', (code) => reject(new Error(`dppa serve exited ${code}:\n${err}`)));
  });
}

function kill(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

/** `dppa ARGS` as a process; resolves with its exit code and output. */
function dppa(
  args: string[],
  env: Record<string, string> = {},
): { child: ChildProcess; done: Promise<{ code: number; out: string; err: string }> } {
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'client/cli/main.ts'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number; out: string; err: string }>((resolve) =>
    child.once('exit', (code) => resolve({ code: code ?? 1, out, err })),
  );
  return { child, done };
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-secure-e2e-'));
  ({ base, finetuned } = await writeLlamaFamily(join(dir, 'family'), { shape, seed: 41, finetunes: 3 }));
  port = await freePort();
  server = await startServer();
});
after(async () => {
  if (server !== undefined) await kill(server);
  await rm(dir, { recursive: true, force: true });
});

describe('secure aggregation through real processes', () => {
  it('three parties: the merge equals the plain merge of their scaled deltas within the fixed-point bound', async () => {
    const address = `127.0.0.1:${port}`;
    const created = await dppa(
      [
        'job',
        'create',
        '--server',
        address,
        '--base',
        base,
        '--parties',
        parties.join(','),
        '--rate',
        '0.8',
        '--privacy',
        'secure',
        '--threshold',
        '2',
        '--clip-bound',
        String(CLIP),
        '--phase-seconds',
        '300',
        '--json',
      ],
      { DPPA_ADMIN_TOKEN: ADMIN },
    ).done;
    assert.equal(created.code, 0, created.err);
    const { jobId, tokens } = JSON.parse(created.out) as { jobId: string; tokens: Record<string, string> };

    // Party math searches its factors against a target made with known factors (its optimum).
    const target = join(dir, 'target-math');
    const mathDelta = join(dir, 'math-target.dppa');
    await pruneToFile({ base, finetuned: finetuned[0]!, rate: 0.8, out: mathDelta });
    await applyDelta({ base, delta: mathDelta, out: target, factors: [1.2, 1.1] });
    const script = join(root, 'test/fixtures/near-eval-cmd.ts');
    const evalCmd = `NEAR_TARGET=${shellQuote(target)} ${shellQuote(process.execPath)} --import tsx ${shellQuote(script)} {model}`;

    const work = (p: string): string => join(dir, `work-${p}`);
    const push = (p: (typeof parties)[number], i: number, extra: string[] = []) =>
      dppa([
        'push',
        '--server',
        address,
        '--job',
        jobId,
        '--party',
        p,
        '--token',
        tokens[p]!,
        '--base',
        base,
        '--finetuned',
        finetuned[i]!,
        '--work-dir',
        work(p),
        ...extra,
      ]);
    const math = push('math', 0, ['--eval-cmd', evalCmd, '--json']);
    // Finance is killed once it has its state file, and run again: it resumes.
    const first = push('finance', 1);
    for (let i = 0; i < 600; i++) {
      const stored = await loadParty(work('finance'), jobId, 'finance').catch(() => undefined);
      if (stored?.protocol !== undefined) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    first.child.kill('SIGKILL');
    await first.done;
    const finance = push('finance', 1);
    const law = push('law', 2);
    for (const r of await Promise.all([math.done, finance.done, law.done])) assert.equal(r.code, 0, r.err);
    // With --json, math's progress is one JSON object a line on stderr; the state alone on stdout.
    const mathRun = await math.done;
    const steps = mathRun.err
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { step: string; type?: string; candidate?: unknown; factors?: number[] });
    assert.deepEqual(steps.find((p) => p.step === 'search')?.candidate, 'dense', mathRun.err);
    assert.ok(
      steps.some((p) => p.type === 'scored' && JSON.stringify(p.candidate) === '[1.2,1.1]'),
      mathRun.err,
    );
    assert.deepEqual(steps.find((p) => p.step === 'factors')?.factors, [1.2, 1.1]);
    assert.deepEqual(
      [...new Set(steps.map((p) => p.step))].filter((s) => ['union', 'maskedComplete', 'unmasked'].includes(s)),
      ['union', 'maskedComplete', 'unmasked'],
    );
    assert.equal((JSON.parse(mathRun.out) as { party: string }).party, 'math');

    const admin = new DppaClient({
      address,
      token: ADMIN,
      retry: { attempts: 20, initialDelayMs: 100, maxDelayMs: 1000 },
    });
    try {
      for await (const e of admin.watchJob(jobId)) if (e.merged !== undefined || e.failed !== undefined) break;
      const final = await admin.getJob(jobId);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      const out = join(dir, 'merged');
      await admin.pull({ jobId, out });

      // The plain merge: each party's factors from its own state, weight 1.
      const pushed = await Promise.all(parties.map((p, i) => pushedParty(finetuned[i]!, work(p), jobId, p)));
      assert.deepEqual(pushed[0]!.factors, [1.2, 1.1], 'math found its optimum locally');
      assert.deepEqual(pushed[1]!.factors, [1, 1]);
      const { same, total } = await assertMatchesPlainMerge({ base, merged: out, clip: CLIP, parties: pushed });
      console.log(
        `secure e2e: ${same} of ${total} weights identical after bf16 rounding (${((100 * same) / total).toFixed(4)}%)`,
      );
    } finally {
      admin.close();
    }
  });
});
