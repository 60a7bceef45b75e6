// Scale-out with real processes: three `dppa serve --cluster` replicas on one shared data folder and a real
// nats-server. Parties upload to different replicas (one upload cut on one replica and resumed on another); the
// only replica merging is SIGKILLed mid-merge; two fresh replicas take its tasks over; the merged checkpoint is
// exactly the independent computation (so is its merged patch applied to the base), and the job merged once.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { jetstream } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { connect } from '@nats-io/transport-node';
import { DppaClient, JobState, type JobEvent } from '../client/index.js';
import { JOBS_BUCKET, mergeKey } from '../server/nats/subjects.js';
import { CLUSTER_ADMIN, createClusterJob, writeClusterFamily, type ClusterFamily } from './fixtures/cluster-family.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { metricValue, startServe, type ServeProcess } from './fixtures/serve-process.js';

// Many small tensors: the merge takes long enough (one KV update per tensor) to kill a replica in the middle of it.
const shape = { layers: 40, hidden: 32, intermediate: 48, vocab: 64 };

let dir: string;
let nats: NatsServer;
let family: ClusterFamily;
const replicas: ServeProcess[] = [];

function replica(): Promise<ServeProcess> {
  const args = [
    '--data',
    join(dir, 'data'),
    '--grpc-port',
    '0',
    '--metrics-port',
    '0',
    '--nats',
    nats.url,
    '--cluster',
    '--task-ack-wait-ms',
    '2000',
  ];
  return startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN }).then((r) => {
    replicas.push(r);
    return r;
  });
}

function client(r: ServeProcess, token: string): DppaClient {
  return new DppaClient({ address: r.address, token, retry: { attempts: 10, initialDelayMs: 100, maxDelayMs: 1000 } });
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cluster-'));
  nats = await startNatsServer();
  family = await writeClusterFamily(dir, shape, 31);
});
after(async () => {
  await Promise.all(replicas.map((r) => r.kill()));
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

describe('three replicas on one NATS and one shared folder', () => {
  it('takes uploads on any replica, survives a replica killed mid-merge, and merges exactly once', async () => {
    const [a, b, c] = await Promise.all([replica(), replica(), replica()]);
    const admin = client(a, CLUSTER_ADMIN);
    const { job, tokens } = await createClusterJob(admin, family);
    const [math, finance, law] = family.parties;
    const total = (await admin.getJob(job.id)).parties.length;
    assert.equal(total, 3);

    // math uploads to B, finance to C: each replica sees the other's progress at once.
    const push = async (r: ServeProcess, p: typeof math, signal?: AbortSignal): Promise<void> => {
      const party = client(r, tokens[p!.name]!);
      try {
        await party.push({ jobId: job.id, party: p!.name, delta: p!.delta }, signal === undefined ? {} : { signal });
      } finally {
        party.close();
      }
    };
    await push(b, math);
    await push(c, finance);
    const onA = await admin.getJob(job.id);
    assert.deepEqual(
      onA.parties.map((p) => p.uploadComplete),
      [true, true, false],
      'replica A sees uploads received by B and C',
    );

    // law starts on C and is cut off once B sees a few of its tensors.
    const cut = new AbortController();
    const cutPush = push(c, law, cut.signal);
    const lawOnB = client(b, tokens.law!);
    try {
      for (;;) {
        const held = await lawOnB.getUploadState(job.id, 'law');
        assert.ok(!held.complete, 'law finished before it could be cut: make the model larger');
        if (held.tensorsReceived.length >= 3) break;
        await new Promise((r) => setTimeout(r, 5));
      }
      cut.abort(new Error('cut'));
      await assert.rejects(cutPush);
      const held = await lawOnB.getUploadState(job.id, 'law');
      assert.ok(held.tensorsReceived.length >= 3 && !held.complete);
    } finally {
      lawOnB.close();
    }

    // B and C stop: A alone will merge, so that killing it leaves the merge half done for sure.
    assert.equal(await b.stop(), 0);
    assert.equal(await c.stop(), 0);

    // law resumes on A, which completes the uploads and starts the merge; A is killed at its first progress.
    const events: JobEvent[] = [];
    const killed = (async () => {
      for await (const e of admin.watchJob(job.id)) {
        events.push(e);
        if (e.mergeProgress !== undefined) {
          await a.kill();
          return e.mergeProgress;
        }
      }
      throw new Error('the job ended before A could be killed');
    })();
    await push(a, law);
    const progress = await killed;
    admin.close();

    // The merge record says how far A got: started, not finished.
    const nc = await connect({ servers: nats.url });
    let writtenAtKill: number;
    let tensorsTotal: number;
    try {
      const kv = await new Kvm(jetstream(nc)).open(JOBS_BUCKET);
      const record = (await kv.get(mergeKey(job.id)))!.json<{ tensorsTotal: number; written: string }>();
      tensorsTotal = record.tensorsTotal;
      writtenAtKill = [...Buffer.from(record.written, 'base64')].reduce((n, byte) => n + popcount(byte), 0);
    } finally {
      await nc.close();
    }
    assert.equal(progress.tensorsTotal, tensorsTotal);
    assert.ok(
      writtenAtKill >= 1 && writtenAtKill < tensorsTotal,
      `A was killed mid-merge (${writtenAtKill}/${tensorsTotal} tensors written)`,
    );

    // Two fresh replicas take over: A's queued tasks at once, the ones it held after the ack wait.
    const [d, e] = await Promise.all([replica(), replica()]);
    const watcher = client(d, CLUSTER_ADMIN);
    try {
      const all: JobEvent[] = [];
      for await (const ev of watcher.watchJob(job.id)) all.push(ev);
      const final = await watcher.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      // The uploads are deleted once merged, and both replicas still show them all received.
      for (const p of family.parties) {
        assert.deepEqual(
          (await readdir(join(dir, 'data', 'jobs', job.id, 'uploads', p.name))).sort(),
          ['discarded.json', 'header.json'],
          p.name,
        );
      }
      for (const r of [d, e]) {
        const viewer = client(r, CLUSTER_ADMIN);
        try {
          const seen = await viewer.getJob(job.id);
          const shown = seen.parties.map((p) => [p.name, p.uploadComplete, p.tensorsReceived, p.tensorsExpected]);
          assert.ok(
            seen.parties.every(
              (p) => p.uploadComplete && p.tensorsReceived === p.tensorsExpected && p.tensorsExpected > 0,
            ),
            JSON.stringify(shown),
          );
        } finally {
          viewer.close();
        }
      }
      assert.equal(all.filter((x) => x.merged !== undefined).length, 1, 'merged announced once');
      assert.equal(all.filter((x) => x.stateChanged?.to === JobState.JOB_STATE_MERGING).length, 1, 'MERGING once');
      assert.equal(all.filter((x) => x.stateChanged?.to === JobState.JOB_STATE_MERGED).length, 1, 'MERGED once');
      for (const p of family.parties)
        assert.equal(all.filter((x) => x.uploadComplete?.party === p.name).length, 1, `${p.name} completed once`);
      // Unique and increasing, not gapless: A was SIGKILLed, and a replica dying between numbering an event and
      // publishing it leaves a gap (docs/scale-out.md).
      const seqs = all.map((x) => Number(x.seq)).sort((x, y) => x - y);
      assert.ok(seqs[0]! >= 1, `event numbers start at 1 or later: ${seqs[0]}`);
      for (let i = 1; i < seqs.length; i++)
        assert.ok(seqs[i]! > seqs[i - 1]!, `event number ${seqs[i]} is used once across replicas`);

      // The survivors merged the rest between them (a tensor A was writing when it died is written again).
      const done = await Promise.all(
        [d, e].map((r) => metricValue(r.metricsPort, 'dppa_cluster_tasks_total{kind="tensor",outcome="done"}')),
      );
      assert.ok(
        done[0]! + done[1]! >= tensorsTotal - writtenAtKill,
        `tensor tasks done after the kill: ${done.join(' + ')}`,
      );
      process.stdout.write(
        `# merge: ${writtenAtKill}/${tensorsTotal} tensors by A before SIGKILL, then ${done[0]} by D and ${done[1]} by E\n`,
      );

      const out = join(dir, 'merged');
      await watcher.pull({ jobId: job.id, out });
      await assertMerged(family.base, out, family.parties);
      // The merged patch (merge.output defaults to both), joined from the tensor pieces A, D and E wrote, applied
      // to the base gives the same checkpoint bit for bit.
      const viaPatch = join(dir, 'merged-via-patch');
      const pulled = await watcher.pull({ jobId: job.id, out: viaPatch, base: family.base });
      assert.ok(pulled.applied !== undefined && pulled.applied.tensorsPatched > 0, 'the patch changes tensors');
      await assertMerged(family.base, viaPatch, family.parties);
    } finally {
      watcher.close();
    }
  });
});

function popcount(byte: number): number {
  let n = 0;
  for (let b = byte; b !== 0; b &= b - 1) n++;
  return n;
}
