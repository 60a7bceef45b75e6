// Cluster building blocks against a real nats-server, without `dppa serve` processes: a WatchJob of a job that
// ended without its final event (lost between the KV write and the publish) ends instead of hanging, and a task's
// heartbeat follows the consumer's actual ack wait rather than the replica's own setting.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { jetstream, jetstreamManager, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { Registry } from 'prom-client';
import { JobState, type JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import { KvMergeRecords } from '../server/cluster/kv-merge-records.js';
import { KvTaskFailures, taskFailuresKey } from '../server/cluster/kv-task-failures.js';
import { MergeDriver, type MergeDriverOptions } from '../server/merge/merge-driver.js';
import { StreamJobEvents } from '../server/cluster/stream-job-events.js';
import { ensureTaskQueue, TaskNotReadyError, TaskQueue } from '../server/cluster/task-queue.js';
import { AttemptsExhaustedError, FailurePolicy } from '../server/jobs/failure-policy.js';
import type { JobStore, StoredJob } from '../server/jobs/job-store.js';
import { createLogger } from '../server/log.js';
import { ClusterMetrics } from '../server/metrics.js';
import type { Spool } from '../server/uploads/spool.js';
import { ensureStream } from '../server/nats/event-publisher.js';
import { JOBS_BUCKET } from '../server/nats/subjects.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';

let nats: NatsServer;
let nc: NatsConnection;
let js: JetStreamClient;
let jsm: JetStreamManager;
let kv: KV;
const log = createLogger({ level: 'silent' });

before(async () => {
  nats = await startNatsServer();
  nc = await connect({ servers: nats.url });
  jsm = await jetstreamManager(nc);
  js = jetstream(nc);
  await ensureStream(jsm);
  kv = await new Kvm(js).create(JOBS_BUCKET, { history: 1 });
});
after(async () => {
  await nc.close();
  await nats.close();
});

/** Every event a watch yields, and how long it took to end. */
async function watchAll(
  events: StreamJobEvents,
  jobId: string,
  timeoutMs: number,
): Promise<{ events: JobEvent[]; ms: number }> {
  const started = Date.now();
  const out: JobEvent[] = [];
  for await (const e of events.watch(jobId, 0n, AbortSignal.timeout(timeoutMs))) out.push(e);
  return { events: out, ms: Date.now() - started };
}

describe('cluster job events', () => {
  it('ends a watch of a job that failed without its final event, once the stream holds nothing more of it', async () => {
    const failed = new Set<string>();
    const events = new StreamJobEvents({
      js,
      jsm,
      kv,
      state: (id) => (failed.has(id) ? JobState.JOB_STATE_FAILED : JobState.JOB_STATE_MERGING),
      idleCheckMs: 100,
    });
    const jobId = 'lostFinalEvent';
    await events.append(jobId, { stateChanged: { from: JobState.JOB_STATE_MERGING, to: JobState.JOB_STATE_FAILED } });
    // The job is FAILED in the store; its `failed` event was never published.
    failed.add(jobId);
    assert.equal(await events.hasFinalEvent(jobId), false);
    const { events: seen, ms } = await watchAll(events, jobId, 10_000);
    assert.deepEqual(
      seen.map((e) => e.seq),
      [1n],
    );
    assert.ok(ms < 5000, `the watch ended after ${ms} ms`);
    assert.equal(events.watcherCount, 0);

    await events.append(jobId, { failed: { reason: 'cancelled' } });
    assert.equal(await events.hasFinalEvent(jobId), true);
  });

  it('waits for the `merged` event of a MERGED job however long after the state it comes', async () => {
    // The committing replica deletes the uploads between the state and the event, or NATS goes away and a commit
    // task publishes the event again seconds later: a watch that ended meanwhile would never deliver it.
    const events = new StreamJobEvents({ js, jsm, kv, state: () => JobState.JOB_STATE_MERGED, idleCheckMs: 100 });
    const jobId = 'lateMerged';
    await events.append(jobId, { stateChanged: { from: JobState.JOB_STATE_MERGING, to: JobState.JOB_STATE_MERGED } });
    const watching = watchAll(events, jobId, 20_000);
    // Many idle checks find the stream holding nothing more of the job.
    await sleep(1500);
    assert.equal(events.watcherCount, 1, 'still watching');
    await events.append(jobId, { merged: { files: ['model.safetensors'], seconds: 1, patch: '' } });
    const { events: seen } = await watching;
    assert.deepEqual(
      seen.map((e) => [e.seq, e.merged?.files]),
      [
        [1n, undefined],
        [2n, ['model.safetensors']],
      ],
    );
    // A job whose events have all expired from the stream has nothing to wait for.
    const expired = await watchAll(events, 'expiredMerged', 10_000);
    assert.deepEqual(expired.events, []);
    assert.equal(events.watcherCount, 0);
  });

  it('keeps watching a job that has not ended, and ends at its final event', async () => {
    const events = new StreamJobEvents({ js, jsm, kv, state: () => JobState.JOB_STATE_MERGING, idleCheckMs: 100 });
    const jobId = 'stillMerging';
    await events.append(jobId, {
      stateChanged: { from: JobState.JOB_STATE_COLLECTING, to: JobState.JOB_STATE_MERGING },
    });
    const watching = watchAll(events, jobId, 20_000);
    await sleep(1000);
    await events.append(jobId, { merged: { files: [], seconds: 1, patch: '' } });
    const { events: seen, ms } = await watching;
    assert.deepEqual(
      seen.map((e) => e.seq),
      [1n, 2n],
    );
    assert.ok(ms >= 1000, 'the watch waited for the final event');
  });
});

describe('cluster merge tasks of a job that is not merging', () => {
  /** Jobs whose uploads the tasks asked the spool to delete. */
  const discarded: string[] = [];
  /** The merge driver's tasks over a store holding one job (`local` in memory, `stored` in the bucket); what these tasks never touch is left out. */
  function mergeTasks(
    events: StreamJobEvents,
    local: Partial<StoredJob>,
    stored: Partial<StoredJob> = local,
  ): MergeDriver {
    const job = (j: Partial<StoredJob>): StoredJob =>
      ({ id: 'j', updatedAt: new Date(0).toISOString(), failureReason: '', merged: undefined, ...j }) as StoredJob;
    const store = {
      get: () => job(local),
      fresh: () => Promise.resolve(job(stored)),
      list: () => [],
    } as unknown as JobStore;
    const spool = { discardJob: (id: string) => Promise.resolve(void discarded.push(id)) } as unknown as Spool;
    return new MergeDriver({
      store,
      events,
      records: new KvMergeRecords(kv),
      log,
      spool,
      mergeWorkers: 0,
      tasks: () => assert.fail('no task is queued'),
    } as unknown as MergeDriverOptions);
  }

  it('publishes a lost `merged` when the commit task runs again, once, and not while it may still be on its way', async () => {
    const events = new StreamJobEvents({ js, jsm, kv, state: () => JobState.JOB_STATE_MERGED });
    const jobId = 'lostMerged';
    await events.append(jobId, { stateChanged: { from: JobState.JOB_STATE_MERGING, to: JobState.JOB_STATE_MERGED } });
    const merged = {
      id: jobId,
      state: JobState.JOB_STATE_MERGED,
      merged: { files: [{ path: 'model.safetensors', size: 1, sha256: '00' }], seconds: 2 },
    };
    const signal = new AbortController().signal;

    const justNow = mergeTasks(events, { ...merged, updatedAt: new Date().toISOString() });
    await assert.rejects(justNow.handle({ kind: 'commit', jobId }, signal), TaskNotReadyError);
    await justNow.close();
    assert.equal(await events.hasFinalEvent(jobId), false);

    const tasks = mergeTasks(events, merged);
    try {
      await tasks.handle({ kind: 'tensor', jobId, tensor: { name: 'x', index: 0 } }, signal);
      assert.equal(await events.hasFinalEvent(jobId), false, 'only a commit task publishes it');
      await tasks.handle({ kind: 'commit', jobId }, signal);
      await tasks.handle({ kind: 'commit', jobId }, signal);
    } finally {
      await tasks.close();
    }
    const seen = [];
    for await (const e of events.watch(jobId, 0n, AbortSignal.timeout(10_000))) seen.push(e);
    assert.deepEqual(
      seen.map((e) => e.merged),
      [undefined, { files: ['model.safetensors'], seconds: 2, patch: '' }],
    );
    assert.ok(
      discarded.length >= 2 && discarded.every((id) => id === jobId),
      'each commit task of the merged job has its uploads deleted (if a replica died before)',
    );
  });

  it("hands back a task of a job the replica's copy shows not yet merging, unless the bucket says it ended", async () => {
    const events = new StreamJobEvents({ js, jsm, kv, state: () => JobState.JOB_STATE_MERGED });
    const signal = new AbortController().signal;
    const stale = mergeTasks(
      events,
      { state: JobState.JOB_STATE_COLLECTING },
      { state: JobState.JOB_STATE_COLLECTING },
    );
    await assert.rejects(stale.handle({ kind: 'plan', jobId: 'j' }, signal), TaskNotReadyError);
    await stale.close();
    const ended = mergeTasks(
      events,
      { state: JobState.JOB_STATE_DPA },
      { state: JobState.JOB_STATE_FAILED, failureReason: 'cancelled' },
    );
    await ended.handle({ kind: 'tensor', jobId: 'j', tensor: { name: 'x', index: 0 } }, signal);
    await ended.close();
  });
});

describe('cluster task queue', () => {
  it("says working() within the consumer's ack wait, even if this replica was started with a longer one", async () => {
    // Another replica (started last) set the consumer's ack wait to 600 ms; this one was told 30 s.
    await ensureTaskQueue(jsm, 600);
    const runs: string[] = [];
    const queue = new TaskQueue({
      js,
      jsm,
      group: 'merge',
      lanes: 2,
      ackWaitMs: 30_000,
      log,
      metrics: new ClusterMetrics(new Registry()),
      policy: new FailurePolicy(),
      failures: new KvTaskFailures(kv),
      failed: () => Promise.resolve(undefined),
      handle: async (task) => {
        runs.push(task.jobId);
        await sleep(2000);
      },
    });
    queue.start();
    try {
      await queue.publish({ kind: 'plan', jobId: 'slowTask' }, 'slowTask.plan');
      for (const deadline = Date.now() + 10_000; runs.length === 0 && Date.now() < deadline;) await sleep(50);
      await sleep(3000);
      assert.deepEqual(runs, ['slowTask'], 'the task ran once: its heartbeat kept it from being redelivered');
    } finally {
      await queue.stop();
    }
  });

  it('counts failures, not deliveries, against --task-attempts: a task handed back as not ready costs none', async () => {
    await ensureTaskQueue(jsm, 30_000);
    const task = { kind: 'plan' as const, jobId: 'notReadyThenBroken' };
    let runs = 0;
    let settled: (err: unknown) => void = () => undefined;
    const final = new Promise<unknown>((resolve) => (settled = resolve));
    const queue = new TaskQueue({
      js,
      jsm,
      group: 'merge',
      lanes: 1,
      ackWaitMs: 30_000,
      log,
      metrics: new ClusterMetrics(new Registry()),
      policy: new FailurePolicy({ taskAttempts: 2 }),
      failures: new KvTaskFailures(kv),
      failed: (_task, err) => {
        settled(err);
        return Promise.resolve(undefined);
      },
      handle: (t) => {
        if (t.jobId !== task.jobId) return Promise.resolve();
        runs++;
        // Four deliveries find the job not ready (e.g. another replica's copy lags), then it fails for real.
        return Promise.reject(runs <= 4 ? new TaskNotReadyError('not yet', 10) : new Error('broken'));
      },
    });
    queue.start();
    try {
      await queue.publish(task, 'notReadyThenBroken.plan');
      const err = await final;
      assert.ok(err instanceof AttemptsExhaustedError);
      assert.equal(err.attempts, 2, 'two real failures, whatever the deliveries');
      assert.equal(runs, 6);
      assert.equal(err.message, 'after 2 attempts: broken');
      // Its count went with it.
      for (let i = 0; i < 50 && (await kv.get(taskFailuresKey(task)))?.operation === 'PUT'; i++) await sleep(50);
      assert.notEqual((await kv.get(taskFailuresKey(task)))?.operation, 'PUT');
    } finally {
      await queue.stop();
    }
  });
});
