// End to end with real processes: a `dppa serve` process, parties pushing with the `dppa push`
// CLI and the SDK, a client and then the server killed with SIGKILL mid-upload, and the merged
// checkpoint checked bit for bit against an independent computation.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState, pruneToFile } from '../client/index.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { readDeltaTensors } from '../proto/sparse/index.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';
import { freePort } from './fixtures/free-port.js';

const ADMIN = 'e2e-admin-token-0123456789abcdef';
const root = new URL('..', import.meta.url).pathname;
const shape = { layers: 6, hidden: 192, intermediate: 512, vocab: 1024 };
const parties = ['math', 'finance', 'law'] as const;
const weights: Record<string, number> = { math: 1, finance: 0.5, law: 1 };
const factors = [1.6, 1.0];

let dir: string;
let base: string;
let finetuned: string[];
let port: number;
let server: ChildProcess | undefined;

/** Starts `dppa serve` on the fixed port and resolves once it listens. */
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
    {
      env: { ...process.env, DPPA_ADMIN_TOKEN: ADMIN },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let out = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  return new Promise((resolve, reject) => {
    // Its log (stderr) says when it listens.
    child.stderr.on('data', () => {
      if (err.includes('grpc listening on')) resolve(child);
    });
    child.once('exit', (code) => reject(new Error(`dppa serve exited ${code}:\n${out}\n${err}`)));
  });
}

function kill(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

/** `dppa push` as a separate process. */
function pushProcess(args: string[]): ChildProcess {
  return spawn(
    process.execPath,
    ['--import', 'tsx', join(root, 'client/cli/main.ts'), 'push', '--server', `127.0.0.1:${port}`, ...args],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
}

function exitCode(child: ChildProcess): Promise<number> {
  return new Promise((resolve) => {
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    child.once('exit', (code) => {
      if (code !== 0) process.stderr.write(err);
      resolve(code ?? 1);
    });
  });
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-e2e-'));
  ({ base, finetuned } = await writeLlamaFamily(join(dir, 'family'), {
    shape,
    seed: 21,
    finetunes: 3,
    shardBytes: 2_000_000,
  }));
  port = await freePort();
  server = await startServer();
});
after(async () => {
  if (server !== undefined) await kill(server);
  await rm(dir, { recursive: true, force: true });
});

describe('three parties through real processes', () => {
  it('survives a killed client and a killed server, and merges exactly base + Σ c_i Σ_p f_p Δ_ip', async () => {
    const admin = new DppaClient({
      address: `127.0.0.1:${port}`,
      token: ADMIN,
      retry: { attempts: 20, initialDelayMs: 100, maxDelayMs: 1000 },
    });
    try {
      const { job, tokens } = await admin.createJob({
        basePath: base,
        parties: [...parties],
        rate: 0.8,
        dpa: { fixed: { factors, perParty: {} }, scaleOutsideByMax: false },
        merge: { weights, signElection: false, partiesMayDownload: false },
      });
      const common = ['--job', job.id, '--base', base, '--workers', '1'];

      // 1. Party "math": its push process is killed once some tensors are in, then run again.
      const first = pushProcess([...common, '--party', 'math', '--token', tokens.math!, '--finetuned', finetuned[0]!]);
      const firstExit = exitCode(first);
      const math = async (): Promise<{ tensorsReceived: number; uploadComplete: boolean }> =>
        (await admin.getJob(job.id)).parties.find((p) => p.name === 'math')!;
      let held = 0;
      for (;;) {
        const state = await math();
        held = state.tensorsReceived;
        assert.ok(!state.uploadComplete, 'the upload finished before it could be interrupted: make the model larger');
        if (held >= 3) break;
        await new Promise((r) => setTimeout(r, 10));
      }
      first.kill('SIGKILL');
      await firstExit;
      const afterKill = await math();
      assert.ok(afterKill.tensorsReceived >= held && !afterKill.uploadComplete);
      assert.equal(
        await exitCode(
          pushProcess([...common, '--party', 'math', '--token', tokens.math!, '--finetuned', finetuned[0]!]),
        ),
        0,
      );
      assert.ok((await math()).uploadComplete);

      // 2. Party "finance" pushes with the SDK; the server is killed (SIGKILL) and restarted under it.
      const party = new DppaClient({
        address: `127.0.0.1:${port}`,
        token: tokens.finance!,
        retry: { attempts: 30, initialDelayMs: 100, maxDelayMs: 500 },
      });
      let restarted: Promise<void> | undefined;
      try {
        const state = await party.push(
          { jobId: job.id, party: 'finance', base, finetuned: finetuned[1]!, workers: 1 },
          {
            onProgress: (p) => {
              if (restarted === undefined && p.phase === 'upload' && p.tensorsDone >= 3) {
                restarted = (async () => {
                  await kill(server!);
                  server = await startServer();
                })();
              }
            },
          },
        );
        await restarted;
        assert.ok(restarted !== undefined, 'the server was restarted during the upload');
        assert.ok(state.complete);
      } finally {
        party.close();
      }

      // 3. Party "law" pushes normally; the job then merges.
      assert.equal(
        await exitCode(
          pushProcess([...common, '--party', 'law', '--token', tokens.law!, '--finetuned', finetuned[2]!]),
        ),
        0,
      );
      const events = [];
      for await (const e of admin.watchJob(job.id)) events.push(e);
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      assert.equal(events.filter((e) => e.merged !== undefined).length, 1, 'merged once');
      assert.equal(events.filter((e) => e.stateChanged?.to === JobState.JOB_STATE_MERGING).length, 1);
      for (const p of parties)
        assert.equal(events.filter((e) => e.uploadComplete?.party === p).length, 1, `${p} completed once`);

      const out = join(dir, 'merged');
      await admin.pull({ jobId: job.id, out });
      await assertMergedExactly(out);
    } finally {
      admin.close();
    }
  });
});

/**
 * The merged checkpoint equals base + Σ_i c_i Σ_p f_p Δ_ip, computed here from independently pruned deltas
 * (Δ = fp32(F − B) where the file carries the fine-tuned weights F).
 */
async function assertMergedExactly(out: string): Promise<void> {
  const acc = new Map<string, Float32Array>();
  const baseValues = new Map<string, Float32Array>();
  const b = await Checkpoint.open(base);
  const m = await Checkpoint.open(out);
  try {
    for (const t of b.tensors()) {
      baseValues.set(t.name, await b.readF32(t.name));
      acc.set(t.name, Float32Array.from(baseValues.get(t.name)!));
    }
    for (const [i, p] of parties.entries()) {
      const file = join(dir, `${p}.dppa`);
      await pruneToFile({ base, finetuned: finetuned[i]!, rate: 0.8, out: file });
      let finetunedValues = false;
      for await (const item of readDeltaTensors(file)) {
        if (item.kind !== 'tensor') {
          finetunedValues = item.header.valueKind === ValueKind.VALUE_KIND_FINETUNED;
          continue;
        }
        const a = acc.get(item.tensor.name)!;
        const bv = baseValues.get(item.tensor.name)!;
        item.tensor.partitions.forEach((part, partition) => {
          const f = partition === 0 ? 1 : factors[partition - 1]!;
          part.positions.forEach((pos, k) => {
            const v = part.values[k]!;
            a[pos] = a[pos]! + weights[p]! * f * (finetunedValues ? Math.fround(v - bv[pos]!) : v);
          });
        });
      }
    }
    assert.deepEqual(
      m.layout.files.map((f) => f.fileName),
      b.layout.files.map((f) => f.fileName),
    );
    for (const t of b.tensors()) {
      const want = Float32Array.from(acc.get(t.name)!, (x) => {
        const u = new Uint32Array(new Float32Array([x]).buffer)[0]!;
        return new Float32Array(new Uint32Array([((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16]).buffer)[0]!;
      });
      assert.deepEqual(await m.readF32(t.name), want, t.name);
    }
  } finally {
    await Promise.all([b.close(), m.close()]);
  }
}
