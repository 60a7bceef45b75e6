// `dppa push` against real `dppa serve` processes that are down, restarted or facing a frozen push: a push
// started while the server is down comes through once it starts; a server killed mid-push and started again
// seconds later sees the push complete; a frozen push (SIGSTOP) does not block a new push of the same party.
// The merges are checked against the independently computed expected merge.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState } from '../client/index.js';
import {
  CLUSTER_ADMIN as ADMIN,
  createClusterJob,
  writeClusterFamily,
  type ClusterFamily,
} from './fixtures/cluster-family.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { metricValue, startServe, type ServeProcess } from './fixtures/serve-process.js';
import { SlowProxy } from './fixtures/slow-proxy.js';

const main = new URL('../client/cli/main.ts', import.meta.url).pathname;
// Enough tensors that a push slowed by the proxy lasts seconds.
const shape = { layers: 20, hidden: 32, intermediate: 48, vocab: 64 };
const UP_BYTES_PER_SECOND = 24_000;

let dir: string;
let data: string;
let family: ClusterFamily;
let server: ServeProcess | undefined;
const pushes: ChildProcess[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cli-resilience-'));
  data = join(dir, 'data');
  family = await writeClusterFamily(dir, shape, 41);
});
after(async () => {
  for (const p of pushes) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  await server?.kill();
  await rm(dir, { recursive: true, force: true });
});

function serve(): Promise<ServeProcess> {
  return startServe(['--data', data, '--grpc-port', '0', '--metrics-port', '0'], { DPPA_ADMIN_TOKEN: ADMIN });
}

/** A `dppa push` child process of one party's delta. */
class Push {
  readonly child: ChildProcess;
  stderr = '';
  readonly exited: Promise<number | null>;

  constructor(address: string, jobId: string, party: string, token: string) {
    const delta = family.parties.find((p) => p.name === party)!.delta;
    const args = [
      'push',
      '--server',
      address,
      '--job',
      jobId,
      '--party',
      party,
      '--token',
      token,
      '--delta',
      delta,
      '--retry-for',
      '2m',
    ];
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DPPA_')));
    this.child = spawn(process.execPath, ['--import', 'tsx', main, ...args], {
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    pushes.push(this.child);
    this.child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
  }

  /** Resolves once its stderr matches `re`. */
  async printed(re: RegExp): Promise<void> {
    await until(`the push prints ${re}`, () => {
      assert.equal(this.child.exitCode, null, `the push exited early: ${this.stderr}`);
      return Promise.resolve(re.test(this.stderr));
    });
  }
}

async function until(what: string, test: () => Promise<boolean>, ms = 60_000): Promise<void> {
  for (const deadline = Date.now() + ms; Date.now() < deadline; await new Promise((r) => setTimeout(r, 50))) {
    if (await test()) return;
  }
  assert.fail(`timed out waiting until ${what}`);
}

/** Tensors of `party` the server holds (0 while it cannot be asked). */
async function held(client: DppaClient, jobId: string, party: string): Promise<{ tensors: number; complete: boolean }> {
  const s = await client.getUploadState(jobId, party);
  return { tensors: s.tensorsReceived.length, complete: s.complete };
}

/** Pushes the other parties (with the SDK, in this process), waits for the merge and checks it. */
async function finishAndCheck(
  admin: DppaClient,
  jobId: string,
  tokens: Record<string, string>,
  except: string,
): Promise<void> {
  for (const p of family.parties.filter((x) => x.name !== except)) {
    const client = new DppaClient({ address: server!.address, token: tokens[p.name]! });
    try {
      await client.push({ jobId, party: p.name, delta: p.delta });
    } finally {
      client.close();
    }
  }
  await until('the job merged', async () => {
    const job = await admin.getJob(jobId);
    assert.notEqual(job.state, JobState.JOB_STATE_FAILED, job.failureReason);
    return job.state === JobState.JOB_STATE_MERGED;
  });
  const out = join(dir, `merged-${jobId}`);
  await admin.pull({ jobId, out });
  await assertMerged(family.base, out, family.parties);
}

describe('dppa push rides out restarts and stalls', () => {
  it('comes through when the server starts within its retry window, saying what it waits for', async () => {
    server = await serve();
    const setup = new DppaClient({ address: server.address, token: ADMIN });
    const { job, tokens } = await createClusterJob(setup, family);
    setup.close();
    await server.stop();
    const proxy = await SlowProxy.start(undefined, 1e9);
    try {
      const push = new Push(proxy.address, job.id, 'math', tokens.math!);
      await push.printed(/GetJob: server unavailable, retrying in \d+(\.\d)?s \(\d+m\d\ds left\)/);
      server = await serve();
      proxy.target = server.address;
      assert.equal(await push.exited, 0, push.stderr);
      const party = new DppaClient({ address: server.address, token: tokens.math! });
      const state = await party.getUploadState(job.id, 'math');
      party.close();
      assert.equal(state.complete, true);
      assert.equal(state.tensorsReceived.length, state.tensorsExpected);
    } finally {
      await proxy.close();
    }
  });

  it('completes a push whose server is killed mid-upload and started again seconds later; the merge is exact', async () => {
    const admin = new DppaClient({ address: server!.address, token: ADMIN });
    const { job, tokens } = await createClusterJob(admin, family);
    admin.close();
    const proxy = await SlowProxy.start(server!.address, UP_BYTES_PER_SECOND);
    try {
      const push = new Push(proxy.address, job.id, 'math', tokens.math!);
      const party = new DppaClient({ address: server!.address, token: tokens.math! });
      await until('the push is under way', async () => (await held(party, job.id, 'math')).tensors >= 2);
      const before = await held(party, job.id, 'math');
      party.close();
      assert.equal(before.complete, false, 'the server was killed mid-push');
      await server!.kill();
      await new Promise((r) => setTimeout(r, 2500));
      server = await serve();
      proxy.target = server.address;
      proxy.upBytesPerSecond = Infinity;
      assert.equal(await push.exited, 0, push.stderr);
      assert.match(push.stderr, /(GetUploadState|Upload): (server unavailable|connection dropped), retrying in/);
      const again = new DppaClient({ address: server.address, token: ADMIN });
      try {
        await finishAndCheck(again, job.id, tokens, 'math');
      } finally {
        again.close();
      }
    } finally {
      await proxy.close();
    }
  });

  it('a frozen push does not block a new push of the same party, which completes; the merge is exact', async () => {
    const admin = new DppaClient({ address: server!.address, token: ADMIN });
    const { job, tokens } = await createClusterJob(admin, family);
    const proxy = await SlowProxy.start(server!.address, UP_BYTES_PER_SECOND);
    try {
      const frozen = new Push(proxy.address, job.id, 'math', tokens.math!);
      const math = new DppaClient({ address: server!.address, token: tokens.math! });
      await until('the push is under way', async () => (await held(math, job.id, 'math')).tensors >= 2);
      frozen.child.kill('SIGSTOP');
      const stopped = await held(math, job.id, 'math');
      math.close();
      assert.equal(stopped.complete, false, 'the push was frozen mid-upload');
      assert.equal(
        await metricValue(server!.metricsPort, 'dppa_uploads_active'),
        1,
        'the frozen push holds its upload slot',
      );
      const fresh = new Push(server!.address, job.id, 'math', tokens.math!);
      assert.equal(await fresh.exited, 0, fresh.stderr);
      await finishAndCheck(admin, job.id, tokens, 'math');
      frozen.child.kill('SIGKILL');
    } finally {
      admin.close();
      await proxy.close();
    }
  });
});
