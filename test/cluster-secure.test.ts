/**
 * Secure aggregation on a cluster, with real processes: a real nats-server, two `dppa serve --cluster` replicas on
 * one shared data folder, three parties pushing a `--privacy secure --threshold 2` job through real gRPC, spread over
 * both replicas. While law's masked upload is open on one replica (holding its claim), a second stream for law on the
 * other replica is refused (ALREADY_EXISTS); law then resumes there. The merged checkpoint equals the plain merge of
 * the same scaled deltas (formed from the checkpoints, as test/secure-e2e.test.ts) within the fixed-point step.
 * Then two replicas race to close SUPPORT and UNMASK (each held before its claim until the other came,
 * fixtures/close-barrier.ts): one claims and closes each phase, the other adopts it, and the merge is the same.
 * The replicas' masked-upload lease is short ({@link LEASE_MS}); where the test needs a claim to stay current it
 * sets its end far ahead in the bucket, and a claim lapses when the test says so: nothing waits on the lease to run
 * out under load.
 */
import assert from 'node:assert/strict';
import { access, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { jetstream } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { connect } from '@nats-io/transport-node';
import { DppaClient, DppaRpcError, JobState } from '../client/index.js';
import type { RetryNotice } from '../client/sdk/retry.js';
import { SecurePhase } from '../proto/gen/dppa/v1/jobs.js';
import { SecureAggregationServiceClient, type MaskedChunk, type MaskedState } from '../proto/gen/dppa/v1/secure.js';
import { crc32c } from '../proto/sparse/index.js';
import { JOBS_BUCKET, jobKey } from '../server/nats/subjects.js';
import { CLUSTER_ADMIN } from './fixtures/cluster-family.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import { GET_SUPPORT_CALLS, metricValue, startServe, type ServeProcess } from './fixtures/serve-process.js';
import { cameToBarrier } from './fixtures/close-barrier.js';
import { assertMatchesPlainMerge, pushedParty } from './fixtures/secure-expected.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';
import { until } from './fixtures/until.js';

const shape = { layers: 2, hidden: 64, intermediate: 128, vocab: 256 };
const parties = ['math', 'finance', 'law'] as const;
const FACTORS: Record<(typeof parties)[number], number[]> = { math: [1.2, 1.1], finance: [1, 1], law: [0.9, 1.3] };
const CLIP = 1;
/** The replicas' masked-upload lease, ms: a stream renews its claim once half of it has passed. */
const LEASE_MS = 4000;
/** A claim's end far ahead (the test makes it lapse itself). */
const FAR = (): string => new Date(Date.now() + 3_600_000).toISOString();

let dir: string;
let nats: NatsServer;
let base: string;
let finetuned: string[];
const replicas: ServeProcess[] = [];

/** A `dppa serve --cluster` replica on the shared data folder, `extra` added to its environment. */
function replica(extra: Record<string, string> = {}): Promise<ServeProcess> {
  const args = ['--data', join(dir, 'data'), '--grpc-port', '0', '--metrics-port', '0', '--nats', nats.url];
  // At debug level a replica logs each time it claims a phase's closing or leaves it to the holder of the claim.
  const env = { DPPA_ADMIN_TOKEN: CLUSTER_ADMIN, DPPA_TEST_MASKED_LEASE_MS: String(LEASE_MS), ...extra };
  return startServe([...args, '--cluster', '--log-level', 'debug'], env).then((r) => {
    replicas.push(r);
    return r;
  });
}

function client(r: ServeProcess, token: string, onRetry?: (n: RetryNotice) => void): DppaClient {
  const retry = { attempts: 30, initialDelayMs: 100, maxDelayMs: 1000 };
  return new DppaClient({ address: r.address, token, retry, ...(onRetry === undefined ? {} : { onRetry }) });
}

/**
 * Party `p`'s push (its fixed factors) of job `jobId` through replica `r`, its private state in `workDir`; `onUnion`
 * is called once it has U.
 */
function push(
  r: ServeProcess,
  jobId: string,
  token: string,
  p: (typeof parties)[number],
  workDir: string,
  o: { signal?: AbortSignal; onUnion?: () => void; onRetry?: (n: RetryNotice) => void } = {},
): Promise<unknown> {
  const c = client(r, token, o.onRetry);
  return c
    .push(
      {
        jobId,
        party: p,
        base,
        finetuned: finetuned[parties.indexOf(p)]!,
        secure: { workDir, factors: FACTORS[p], pollMs: 50 },
      },
      { ...(o.signal === undefined ? {} : { signal: o.signal }), onSecure: (s) => s.step === 'union' && o.onUnion?.() },
    )
    .finally(() => c.close());
}

function bearer(token: string): Metadata {
  const m = new Metadata();
  m.set('authorization', `Bearer ${token}`);
  return m;
}

/** An UploadMasked stream opened on a replica: its first chunk sent, the stream left open until `end`. */
function openMasked(
  r: ServeProcess,
  token: string,
  first: MaskedChunk,
): { result: Promise<MaskedState>; write: (c: MaskedChunk) => void; end: () => void; close: () => void } {
  const secure = new SecureAggregationServiceClient(r.address, credentials.createInsecure());
  let stream: ReturnType<SecureAggregationServiceClient['uploadMasked']> | undefined;
  const result = new Promise<MaskedState>((resolve, reject) => {
    stream = secure.uploadMasked(bearer(token), (err, res) => (err === null ? resolve(res) : reject(err)));
    stream.write(first);
  });
  return {
    result,
    write: (c) => void stream!.write(c),
    end: () => void stream!.end(),
    close: () => secure.close(),
  };
}

/** GetMaskedState of the party whose token this is, on a replica. */
function maskedState(r: ServeProcess, token: string, jobId: string): Promise<MaskedState> {
  const secure = new SecureAggregationServiceClient(r.address, credentials.createInsecure());
  return new Promise<MaskedState>((resolve, reject) =>
    secure.getMaskedState({ jobId }, bearer(token), (err, res) => (err === null ? resolve(res) : reject(err))),
  ).finally(() => secure.close());
}

/** The bucket's revision of the job's entry (it changes with every write of the job). */
async function storedRevision(jobId: string): Promise<number> {
  const nc = await connect({ servers: nats.url });
  try {
    const kv = await new Kvm(jetstream(nc)).open(JOBS_BUCKET);
    return (await kv.get(jobKey(jobId)))!.revision;
  } finally {
    await nc.close();
  }
}

/** The secure part of the job as the KV bucket holds it. */
async function storedSecure(jobId: string): Promise<StoredSecure> {
  const nc = await connect({ servers: nats.url });
  try {
    const kv = await new Kvm(jetstream(nc)).open(JOBS_BUCKET);
    return (await kv.get(jobKey(jobId)))!.json<{ secure: StoredSecure }>().secure;
  } finally {
    await nc.close();
  }
}

/** The secure part of a job as stored in the bucket (the fields this test reads or changes). */
interface StoredSecure {
  maskedClaims?: Record<string, { id: string; until: string }>;
  closing?: { phase: string; id: string; until: string };
}

/** Changes the secure part of the job in the bucket (compare-and-swap, as a replica would). */
async function rewriteSecure(jobId: string, change: (s: StoredSecure) => void): Promise<void> {
  const nc = await connect({ servers: nats.url });
  try {
    const kv = await new Kvm(jetstream(nc)).open(JOBS_BUCKET);
    for (let attempt = 1; ; attempt++) {
      const e = (await kv.get(jobKey(jobId)))!;
      const job = e.json<{ secure: StoredSecure }>();
      change(job.secure);
      try {
        await kv.update(jobKey(jobId), `${JSON.stringify(job, null, 2)}\n`, e.revision);
        return;
      } catch (err) {
        if (attempt >= 10) throw err;
      }
    }
  } finally {
    await nc.close();
  }
}

/** Sets the end of a party's masked-upload claim: `new Date(0)` makes it lapse, as its lease's time passing would. */
function claimUntil(jobId: string, party: string, until: string): Promise<void> {
  return rewriteSecure(jobId, (s) => (s.maskedClaims![party]!.until = until));
}

function lapse(jobId: string, party: string): Promise<void> {
  return claimUntil(jobId, party, new Date(0).toISOString());
}

const exists = (p: string): Promise<boolean> =>
  access(p).then(
    () => true,
    () => false,
  );

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cluster-secure-'));
  nats = await startNatsServer();
  ({ base, finetuned } = await writeLlamaFamily(join(dir, 'family'), { shape, seed: 43, finetunes: 3 }));
});
after(async () => {
  await Promise.all(replicas.map((r) => r.kill()));
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

describe('secure aggregation on two replicas sharing one NATS and one data folder', () => {
  it('merges the parties spread over both replicas as the plain merge does; one masked stream per party', async () => {
    const [a, b] = await Promise.all([replica(), replica()]);
    const admin = client(a, CLUSTER_ADMIN);
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: [...parties],
      rate: 0.8,
      secure: { threshold: 2, clipBound: CLIP, phaseSeconds: 300 },
    });
    const jobDir = join(dir, 'data', 'jobs', job.id);
    const work = (p: string): string => join(dir, `work-${p}`);

    // A replica that died while closing SUPPORT left its claim (planted here): the others leave the phase alone.
    const dead = { phase: 'SECURE_PHASE_SUPPORT', id: 'a-replica-that-died', until: new Date(Date.now() + 600_000) };
    await rewriteSecure(job.id, (sec) => (sec.closing = { ...dead, until: dead.until.toISOString() }));

    // math on A, finance on B; law on A stops once it has U, before any masked word.
    const math = push(a, job.id, tokens.math!, 'math', work('math'));
    const finance = push(b, job.id, tokens.finance!, 'finance', work('finance'));
    const stopLaw = new AbortController();
    const lawStops = push(a, job.id, tokens.law!, 'law', work('law'), {
      signal: stopLaw.signal,
      onUnion: () => stopLaw.abort(new Error('law stops')),
    });
    // Awaited below; handled here too so that a failure before then does not also leave an unhandled rejection.
    for (const p of [math, finance, lawStops]) p.catch(() => undefined);

    // Every support is in, yet SUPPORT stays open while the claim is current: a replica's sweep (every 5 s) after
    // that tries to close it and leaves it to the claim's holder (its debug log says so) ...
    await until('the three supports', async () =>
      (await admin.getJob(job.id)).parties.every((p) => p.uploadComplete) ? true : undefined,
    );
    const logged = [a, b].map((r) => r.stderr().length);
    const leftToHolder = (line: string): boolean =>
      line.includes('"msg":"secure phase left to the server that claimed its closing"') &&
      line.includes('"phase":"SUPPORT"');
    await until('a replica leaving SUPPORT to the claim’s holder', () =>
      Promise.resolve(
        [a, b].some((r, i) => r.stderr().slice(logged[i]).split('\n').some(leftToHolder)) ? true : undefined,
      ),
    );
    assert.equal((await admin.getJob(job.id)).securePhase, SecurePhase.SECURE_PHASE_SUPPORT);
    assert.equal((await storedSecure(job.id)).closing?.id, dead.id);
    // ... and once it lapses, a replica closes it (at its next sweep) and the rounds go on.
    await rewriteSecure(job.id, (sec) => (sec.closing!.until = new Date(0).toISOString()));
    await assert.rejects(lawStops, /law stops/);
    const masked = await admin.getJob(job.id);
    assert.equal(masked.securePhase, SecurePhase.SECURE_PHASE_MASKED_INPUT);

    // Really secure: the spool holds the masked words of math and finance, |U| words each (and beside each the count
    // of values it clipped), and nothing of law.
    const words = Number((await maskedState(b, tokens.law!, job.id)).wordsExpected);
    for (const p of ['math', 'finance'])
      await until(`${p}'s whole masked vector`, async () =>
        (await maskedState(a, tokens[p]!, job.id)).complete ? true : undefined,
      );
    const files = await readdir(join(jobDir, 'secure', 'masked'));
    assert.deepEqual(files.sort(), ['finance.clipped', 'finance.u32', 'math.clipped', 'math.u32']);
    for (const f of files.filter((f) => f.endsWith('.u32')))
      assert.equal((await stat(join(jobDir, 'secure', 'masked', f))).size, 4 * words);
    assert.ok(words > 1000, `|U| = ${words}`);

    // law opens a masked stream on A (a zero-word chunk at 0: nothing written, the stream stays open) ...
    const empty = new Uint8Array(0);
    const first: MaskedChunk = {
      jobId: job.id,
      offset: 0n,
      words: empty,
      crc32c: crc32c(empty),
      totalWords: BigInt(words),
      clipped: 0n,
    };
    const onA = openMasked(a, tokens.law!, first);
    const claim = await until(
      'law’s claim in the job record',
      async () => (await storedSecure(job.id)).maskedClaims?.law,
    );
    assert.ok(Date.parse(claim.until) > Date.now());
    // (Kept current whatever the load: A does not renew it while no chunk comes.)
    await claimUntil(job.id, 'law', FAR());
    // ... so that a second stream for law on B is refused while it is open.
    const onB = openMasked(b, tokens.law!, first);
    onB.end();
    await assert.rejects(onB.result, (err: ServiceError) => {
      assert.equal(err.code, status.ALREADY_EXISTS, err.message);
      assert.match(err.details, /already has a masked upload open on another server/);
      return true;
    });
    onB.close();
    // A's stream ends: its claim goes with it.
    onA.end();
    assert.equal((await onA.result).wordsHeld, 0n);
    onA.close();
    assert.equal((await storedSecure(job.id)).maskedClaims?.law, undefined, 'the claim is released at the end');

    // A stream whose claim lapsed and was taken over by another replica (done here in the bucket) stops at its next
    // chunk once half its lease has passed (when it renews): ABORTED, nothing written.
    const onA2 = openMasked(a, tokens.law!, first);
    const mine = await until('law’s second claim on A', async () => (await storedSecure(job.id)).maskedClaims?.law);
    await rewriteSecure(job.id, (sec) => (sec.maskedClaims!.law = { id: 'another-replica', until: FAR() }));
    const taken = await storedRevision(job.id);
    // At least half a lease after A took the claim (the wait can only be longer under load).
    await new Promise((r) => setTimeout(r, LEASE_MS / 2 + 100));
    onA2.write(first);
    await assert.rejects(onA2.result, (err: ServiceError) => {
      assert.equal(err.code, status.ABORTED, err.message);
      assert.match(err.details, /another server took over its masked upload/);
      return true;
    });
    onA2.close();
    assert.equal((await storedSecure(job.id)).maskedClaims?.law?.id, 'another-replica', 'the other claim is kept');
    // Neither the refused renewal nor the release of a claim no longer held wrote the job.
    assert.equal(await storedRevision(job.id), taken);
    await lapse(job.id, 'law');

    // A replica that dies with law's stream open leaves its claim: law (resuming on B) is refused and waits until the
    // claim lapses (its time is made to pass here), then B takes law's upload over.
    const c = await replica();
    const onC = openMasked(c, tokens.law!, first);
    onC.result.catch(() => undefined);
    const cs = await until('replica C’s claim', async () => {
      const l = (await storedSecure(job.id)).maskedClaims?.law;
      return l !== undefined && ![claim.id, mine.id, 'another-replica'].includes(l.id) ? l : undefined;
    });
    const left = { id: cs.id, until: FAR() };
    await claimUntil(job.id, 'law', left.until);
    await c.kill();
    onC.close();
    // law's push on B reaches UploadMasked, is refused and waits (the SDK's retry notice says why) ...
    let refused!: () => void;
    const waits = new Promise<void>((resolve) => (refused = resolve));
    const law = push(b, job.id, tokens.law!, 'law', work('law'), {
      onRetry: (n) => {
        const e = n.error;
        if (e instanceof DppaRpcError && e.code === status.ALREADY_EXISTS && /on another server/.test(e.details))
          refused();
      },
    });
    law.catch(() => undefined);
    await waits;
    // ... while the dead replica's claim stays; once it lapses, B takes law's upload.
    assert.deepEqual((await storedSecure(job.id)).maskedClaims?.law, left, 'the dead replica’s claim stays');
    await lapse(job.id, 'law');
    await Promise.all([math, finance, law]);

    try {
      for await (const e of admin.watchJob(job.id)) if (e.merged !== undefined || e.failed !== undefined) break;
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      assert.equal((await storedSecure(job.id)).maskedClaims, undefined, 'no claim left once MASKED_INPUT closed');
      // Nothing of the masked vectors stays; the discard left its mark.
      assert.equal(await exists(join(jobDir, 'secure', 'masked')), false);
      assert.equal(await exists(join(jobDir, 'secure', 'discarded')), true);
      const out = join(dir, 'merged');
      await admin.pull({ jobId: job.id, out });
      await assertPlainMerge(out, job.id, work);
    } finally {
      admin.close();
    }
  });
});

// A replica that never came to the barrier would hold the other (and the job) there: the test fails instead.
describe('two replicas racing to close a secure phase', { timeout: 180_000 }, () => {
  it('both try to claim SUPPORT and UNMASK at once: one claims and writes, the other adopts; the merge is right', async () => {
    // Only the two replicas of this test sweep the shared bucket.
    await Promise.all(replicas.map((r) => r.kill()));
    // Each replica about to claim a closing waits there until the other came too (fixtures/close-barrier.ts).
    const barrier = await mkdtemp(join(dir, 'barrier-'));
    const [a, b] = await Promise.all([0, 1].map(() => replica({ DPPA_TEST_CLOSE_BARRIER: `2:${barrier}` })));
    const admin = client(a!, CLUSTER_ADMIN);
    try {
      const { job, tokens } = await admin.createJob({
        basePath: base,
        parties: [...parties],
        rate: 0.8,
        secure: { threshold: 2, clipBound: CLIP, phaseSeconds: 300 },
      });
      const work = (p: string): string => join(dir, `race-work-${p}`);
      // Parties on both replicas: each serves U, whichever built it.
      await Promise.all([
        push(a!, job.id, tokens.math!, 'math', work('math')),
        push(b!, job.id, tokens.finance!, 'finance', work('finance')),
        push(b!, job.id, tokens.law!, 'law', work('law')),
      ]);
      const closed = [];
      for await (const e of admin.watchJob(job.id)) {
        if (e.securePhaseClosed !== undefined) closed.push(e.securePhaseClosed.phase);
        if (e.merged !== undefined || e.failed !== undefined) break;
      }
      const final = await admin.getJob(job.id);
      assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
      // Each phase closed once.
      assert.deepEqual(closed, [
        SecurePhase.SECURE_PHASE_SUPPORT,
        SecurePhase.SECURE_PHASE_KEYS,
        SecurePhase.SECURE_PHASE_SHARES,
        SecurePhase.SECURE_PHASE_MASKED_INPUT,
        SecurePhase.SECURE_PHASE_UNMASK,
      ]);

      const pids = [a!, b!].map((r) => r.child.pid!).sort();
      const lines = (r: ServeProcess, msg: string, phase: string): number =>
        r
          .stderr()
          .split('\n')
          .filter(
            (l) =>
              l.includes(`"msg":"${msg}"`) && l.includes(`"jobId":"${job.id}"`) && l.includes(`"phase":"${phase}"`),
          ).length;
      for (const phase of ['SUPPORT', 'UNMASK']) {
        // Both replicas came to claim the closing, and neither had claimed it before the other came ...
        assert.deepEqual((await cameToBarrier(barrier, job.id, phase)).sort(), pids, phase);
        // ... yet one replica alone claimed it, and that one closed the phase (wrote U, or the sum).
        const claimed = [a!, b!].map((r) => lines(r, 'secure phase claimed for closing', phase));
        const closers = [a!, b!].map((r) => lines(r, 'secure phase closed', phase));
        assert.deepEqual([...claimed].sort(), [0, 1], `${phase}: claims per replica ${claimed.join(', ')}`);
        assert.deepEqual(closers, claimed, `${phase}: closings per replica ${closers.join(', ')}`);
      }
      // The replica that did not build U served it too, as the other built it: every party's vector is on one U.
      for (const r of [a!, b!]) assert.ok((await metricValue(r.metricsPort, GET_SUPPORT_CALLS)) >= 1, 'GetSupport');
      const out = join(dir, 'race-merged');
      await admin.pull({ jobId: job.id, out });
      await assertPlainMerge(out, job.id, work);
    } finally {
      admin.close();
    }
  });
});

/**
 * The merged checkpoint against the plain merge: Δ = F − B in fp32 at each party's kept positions (only the
 * positions and the value precision are read from its delta file), rounded to that precision, times the factors the
 * party stored; weight 1. After bf16 rounding ≥ 99.99% identical, every other weight within the bound.
 */
async function assertPlainMerge(out: string, jobId: string, work: (p: string) => string): Promise<void> {
  const pushed = await Promise.all(parties.map((p, i) => pushedParty(finetuned[i]!, work(p), jobId, p)));
  parties.forEach((p, i) => assert.deepEqual(pushed[i]!.factors, FACTORS[p]));
  const { same, total, changed } = await assertMatchesPlainMerge({ base, merged: out, clip: CLIP, parties: pushed });
  assert.ok(changed > total / 20, `the merge changed ${changed} of ${total} weights`);
  console.log(`cluster secure: ${same} of ${total} weights identical after bf16 rounding`);
}
