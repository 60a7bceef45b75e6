// One party's damaged upload on a cluster: two `dppa serve --cluster` replicas (real processes) on one shared data
// folder and a real nats-server. A spool file of one party is damaged on disk before the last upload; the merge's
// tensor task that reads it sends that party back to collecting on every replica's view, the other parties' uploads
// are kept, and once the party has pushed again the job merges exactly the independent computation.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState } from '../client/index.js';
import { readDeltaHeader } from '../proto/sparse/index.js';
import { CLUSTER_ADMIN, createClusterJob, writeClusterFamily, type ClusterFamily } from './fixtures/cluster-family.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { startServe, type ServeProcess } from './fixtures/serve-process.js';
import { TINY } from './fixtures/synthetic-model.js';

let dir: string;
let nats: NatsServer;
let family: ClusterFamily;
const replicas: ServeProcess[] = [];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cluster-stop-'));
  nats = await startNatsServer();
  family = await writeClusterFamily(dir, TINY, 17);
});
after(async () => {
  await Promise.all(replicas.map((r) => r.kill()));
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

function client(r: ServeProcess, token: string): DppaClient {
  return new DppaClient({ address: r.address, token, retry: { attempts: 10, initialDelayMs: 100, maxDelayMs: 1000 } });
}

describe('a party whose spooled tensor is damaged, on a cluster', () => {
  it('goes back to collecting on every replica, pushes again, and the job merges exactly', async () => {
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
    const [a, b] = await Promise.all([
      startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN }),
      startServe(args, { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN }),
    ]);
    replicas.push(a, b);
    const admins = [client(a, CLUSTER_ADMIN), client(b, CLUSTER_ADMIN)];
    const { job, tokens } = await createClusterJob(admins[0]!, family);
    const push = async (r: ServeProcess, name: string): Promise<void> => {
      const party = client(r, tokens[name]!);
      try {
        await party.push({ jobId: job.id, party: name, delta: family.parties.find((p) => p.name === name)!.delta });
      } finally {
        party.close();
      }
    };
    try {
      await push(a, 'math');
      await push(b, 'finance');
      // A byte in the middle of one of math's spool files: its chunk CRC no longer matches.
      const tensor = 'model.layers.1.self_attn.v_proj.weight';
      const header = await readDeltaHeader(family.parties[0]!.delta);
      const file = join(
        dir,
        'data',
        'jobs',
        job.id,
        'uploads',
        'math',
        `${header.tensors.findIndex((t) => t.name === tensor)}.dppa`,
      );
      const bytes = await readFile(file);
      const middle = Math.floor(bytes.length * 0.6);
      bytes[middle] = bytes[middle]! ^ 0x55;
      await writeFile(file, bytes);

      const stopped = (async () => {
        for await (const e of admins[1]!.watchJob(job.id)) if (e.partyStopped !== undefined) return e.partyStopped;
        throw new Error('the job ended without a party_stopped event');
      })();
      await push(a, 'law');
      const stop = await stopped;
      assert.equal(stop.party, 'math');
      assert.deepEqual(stop.discardedTensors, [tensor]);
      assert.match(
        stop.reason,
        new RegExp(
          `^tensor "${tensor.replaceAll('.', '\\.')}" of its upload cannot be used \\(\\S+/uploads/math/\\d+\\.dppa, tensor "${tensor.replaceAll('.', '\\.')}": .+\\); it was discarded: push again to send it$`,
        ),
      );
      // Every replica shows it: the job collecting, math one tensor short with the reason, the others complete.
      for (const admin of admins) {
        let shown = await admin.getJob(job.id);
        // The job goes back to collecting in the bucket first, then the tensor is dropped; a replica reads the folder
        // at each GetJob but the state from its copy of the bucket, which may lag behind (under load): wait for both.
        while (shown.parties[0]!.uploadComplete || shown.state === JobState.JOB_STATE_MERGING) {
          await new Promise((r) => setTimeout(r, 50));
          shown = await admin.getJob(job.id);
        }
        assert.equal(shown.state, JobState.JOB_STATE_COLLECTING);
        assert.deepEqual(
          shown.parties.map((p) => p.stoppedReason),
          [stop.reason, '', ''],
        );
        assert.equal(shown.parties[0]!.tensorsReceived, shown.parties[0]!.tensorsExpected - 1);
        assert.deepEqual(
          shown.parties.map((p) => p.uploadComplete),
          [false, true, true],
        );
      }

      await push(b, 'math');
      const events = [];
      for await (const e of admins[0]!.watchJob(job.id)) events.push(e);
      assert.ok(events.at(-1)?.merged !== undefined, 'the job merged');
      assert.equal(events.filter((e) => e.partyStopped !== undefined).length, 1);
      const done = await admins[0]!.getJob(job.id);
      assert.equal(done.state, JobState.JOB_STATE_MERGED);
      assert.deepEqual(
        done.parties.map((p) => p.stoppedReason),
        ['', '', ''],
      );
      await assertMerged(family.base, join(dir, 'data', 'jobs', job.id, 'merged'), family.parties);
    } finally {
      for (const admin of admins) admin.close();
    }
  });
});
