// Failure behaviour of `dppa serve --cluster` with real processes and a real nats-server: NATS unreachable at start
// (a clear error, exit code 1); NATS stopped and started again mid-job (same port and store), once between uploads
// (calls that need it get UNAVAILABLE meanwhile) and once during the merge: the job completes with the exact merge.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { DppaClient, DppaRpcError, JobState } from '../client/index.js';
import { CLUSTER_ADMIN, createClusterJob, writeClusterFamily, type ClusterFamily } from './fixtures/cluster-family.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { freePort } from './fixtures/free-port.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { metricValue, serveFailure, startServe, type ServeProcess } from './fixtures/serve-process.js';

// Enough small tensors for the merge to last a moment (it is interrupted).
const shape = { layers: 20, hidden: 32, intermediate: 48, vocab: 64 };

let dir: string;
let nats: NatsServer;
let family: ClusterFamily;
const replicas: ServeProcess[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cluster-fail-'));
  nats = await startNatsServer();
  family = await writeClusterFamily(dir, shape, 32);
});
after(async () => {
  await Promise.all(replicas.map((r) => r.kill()));
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

function serveArgs(url: string): string[] {
  return ['--data', join(dir, 'data'), '--grpc-port', '0', '--metrics-port', '0', '--nats', url, '--cluster'];
}

/** The gRPC code a call failed with. */
async function codeOf(call: Promise<unknown>): Promise<number> {
  try {
    await call;
  } catch (err) {
    if (err instanceof DppaRpcError) return err.code;
    throw err;
  }
  throw new Error('the call succeeded');
}

describe('a cluster replica and NATS', () => {
  it('does not start while NATS is unreachable, and says where it looked', async () => {
    const url = `nats://127.0.0.1:${await freePort()}`;
    const { code, stderr } = await serveFailure(serveArgs(url), { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN });
    assert.equal(code, 1);
    assert.match(
      stderr,
      new RegExp(`dppa serve: cannot start: cannot connect to NATS at ${url.replace(/\./g, '\\.')}`),
    );
  });

  it('refuses --cluster without --nats', async () => {
    const { code, stderr } = await serveFailure(['--data', join(dir, 'data'), '--cluster'], {
      DPPA_ADMIN_TOKEN: CLUSTER_ADMIN,
    });
    assert.equal(code, 2);
    assert.match(stderr, /--cluster needs --nats/);
  });

  it('answers UNAVAILABLE while NATS is away, and completes the job however often NATS goes away', async () => {
    // Tasks whose replica could not hand them back (NATS away) come back after the ack wait: 2 s.
    const args = [...serveArgs(nats.url), '--task-ack-wait-ms', '2000'];
    const [a, b] = await Promise.all([
      startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN }),
      startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN }),
    ]);
    replicas.push(a, b);
    const retrying = { attempts: 30, initialDelayMs: 200, maxDelayMs: 1000 };
    const admin = new DppaClient({ address: a.address, token: CLUSTER_ADMIN, retry: retrying });
    const once = new DppaClient({ address: b.address, token: CLUSTER_ADMIN, retry: { attempts: 1 } });
    const party = (r: ServeProcess, name: string, token: string, attempts: number): Promise<unknown> => {
      const c = new DppaClient({ address: r.address, token, retry: { ...retrying, attempts } });
      return c
        .push({ jobId: job.id, party: name, delta: family.parties.find((p) => p.name === name)!.delta })
        .finally(() => c.close());
    };
    const { job, tokens } = await createClusterJob(admin, family);
    try {
      await party(a, 'math', tokens.math!, 1);

      await nats.stop();
      assert.equal(await codeOf(createClusterJob(once, family)), status.UNAVAILABLE, 'CreateJob needs the jobs bucket');
      assert.equal(
        await codeOf(party(b, 'finance', tokens.finance!, 1)),
        status.UNAVAILABLE,
        'an upload needs the jobs bucket and the event stream',
      );
      // Reads are served from the replica's copy of the bucket.
      assert.equal((await once.getJob(job.id)).state, JobState.JOB_STATE_COLLECTING);

      await nats.start();
      // The clients retry until the replicas have reconnected.
      await party(b, 'finance', tokens.finance!, 30);
      // NATS goes away again as soon as the merge has started; the replicas' tasks fail, wait and carry on.
      const merging = (async () => {
        for await (const e of admin.watchJob(job.id)) if (e.mergeProgress !== undefined) return e.mergeProgress;
        throw new Error('the job ended before its merge was seen');
      })();
      await party(a, 'law', tokens.law!, 30);
      const progress = await merging;
      // The outage must hit the merge, not follow it.
      assert.ok(
        progress.tensorsDone < progress.tensorsTotal,
        `the merge was under way when NATS stopped (${progress.tensorsDone}/${progress.tensorsTotal})`,
      );
      const stoppedAt = Date.now();
      await nats.stop();
      await new Promise((r) => setTimeout(r, 1500));
      await nats.start();
      const restartedAt = Date.now();
      // However long the rest of the merge takes: a watch ends at the job's final event (the client resumes it after the outage).
      const events = [];
      for await (const e of admin.watchJob(job.id)) events.push(e);
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      assert.equal(events.filter((e) => e.merged !== undefined).length, 1, 'the watch ended at `merged`');
      const toMerged = events.filter((e) => e.stateChanged?.to === JobState.JOB_STATE_MERGED);
      assert.equal(toMerged.length, 1);
      // Committing needs NATS: a job that moved to MERGED after the stop finished its merge after the outage.
      assert.ok(
        Date.parse(toMerged[0]!.time) > stoppedAt,
        `the job merged after NATS was stopped (${toMerged[0]!.time})`,
      );
      const retried = await Promise.all(
        [a, b].map((r) => metricValue(r.metricsPort, 'dppa_cluster_tasks_total{kind="tensor",outcome="retried"}')),
      );
      const mergedAfter = (Date.parse(toMerged[0]!.time) - restartedAt) / 1000;
      process.stdout.write(
        `# NATS stopped at ${progress.tensorsDone}/${progress.tensorsTotal} tensors merged; MERGED ${mergedAfter.toFixed(1)} s after NATS came back; tensor tasks retried: ${retried.join(' / ')}\n`,
      );
      const out = join(dir, 'merged');
      await admin.pull({ jobId: job.id, out });
      await assertMerged(family.base, out, family.parties);
    } finally {
      admin.close();
      once.close();
    }
  });
});
