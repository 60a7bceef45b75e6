/**
 * The union U on the party's side of a secure push (client/sdk/secure-push.ts), with SDK parties over real gRPC to
 * an embedded server: a party run again after the server recorded its whole masked vector does not download U again
 * (counted by the server's own `grpc_server_started_total` for GetSupport) and still finishes, the merge equal to the
 * plain one; a push that ends in an error (stopped mid-upload, or refused by the server because the job failed under
 * it) leaves no `union.bin` in its working folder.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { access, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { DppaClient, DppaRpcError, JobState, type SecureProgress } from '../client/index.js';
import { loadParty, saveParty } from '../client/secure/party-store.js';
import { SecurePhase } from '../proto/gen/dppa/v1/jobs.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { assertMatchesPlainMerge, pushedParty } from './fixtures/secure-expected.js';
import { GET_SUPPORT_CALLS, metricValue } from './fixtures/serve-process.js';
import { SlowProxy } from './fixtures/slow-proxy.js';
import { writeLlamaFamily } from './fixtures/synthetic-model.js';
import { until } from './fixtures/until.js';

const shape = { layers: 2, hidden: 32, intermediate: 64, vocab: 64 };
const CLIP = 1;
const retry = { attempts: 5, initialDelayMs: 20, maxDelayMs: 200 };
let dir: string;
let base: string;
let finetuned: string[];
let h: Harness;
let admin: DppaClient;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-secure-party-union-'));
  ({ base, finetuned } = await writeLlamaFamily(join(dir, 'family'), { shape, seed: 61, finetunes: 3 }));
  h = await startHarness(join(dir, 'data'), { mergeWorkers: 0 });
  admin = new DppaClient({ address: h.address, token: ADMIN, retry });
});
after(async () => {
  admin?.close();
  await h?.close();
  await rm(dir, { recursive: true, force: true });
});

/** GetSupport calls the server started so far (its own gRPC metric). */
function getSupportCalls(): Promise<number> {
  return metricValue(h.server.metricsPort, GET_SUPPORT_CALLS);
}

/** The files of a working folder that hold U or a piece of it (`union.bin`, or any temporary copy). */
async function unionFiles(workDir: string): Promise<string[]> {
  return (await readdir(workDir)).filter((f) => f.startsWith('union'));
}

/** One party's push of job `jobId` (fine-tune `i`, factors 1) through `address`, its steps recorded in `steps`. */
function push(
  address: string,
  jobId: string,
  party: string,
  token: string,
  i: number,
  o: { signal?: AbortSignal; onSecure?: (p: SecureProgress) => void; steps?: string[] } = {},
): Promise<unknown> {
  const client = new DppaClient({ address, token, retry });
  return client
    .push(
      {
        jobId,
        party,
        base,
        finetuned: finetuned[i]!,
        workers: 1,
        secure: { workDir: join(dir, `work-${jobId}-${party}`), pollMs: 50 },
      },
      {
        ...(o.signal === undefined ? {} : { signal: o.signal }),
        onSecure: (p) => {
          o.steps?.push(p.step);
          o.onSecure?.(p);
        },
      },
    )
    .finally(() => client.close());
}

/** A secure job (t = 2) of `parties`, their tokens, and each party's working folder for it. */
async function secureJob(parties: string[]) {
  const { job, tokens } = await admin.createJob({
    basePath: base,
    parties,
    rate: 0.8,
    secure: { threshold: 2, clipBound: CLIP, phaseSeconds: 300 },
  });
  return { job, tokens, work: (p: string): string => join(dir, `work-${job.id}-${p}`) };
}

describe('the union on the party’s side', { timeout: 120_000 }, () => {
  it('a party whose masked vector the server holds does not download U again, and finishes', async () => {
    const parties = ['p1', 'p2', 'p3'];
    const { job, tokens, work } = await secureJob(parties);
    const calls0 = await getSupportCalls();
    // p2 and p3 push to the end; p1 stops once the server holds its whole vector.
    const others = parties.slice(1).map((p, k) => push(h.address, job.id, p, tokens[p]!, k + 1));
    for (const o of others) o.catch(() => undefined);
    const stop = new AbortController();
    const first: string[] = [];
    await assert.rejects(
      push(h.address, job.id, 'p1', tokens.p1!, 0, {
        signal: stop.signal,
        steps: first,
        onSecure: (p) => p.step === 'maskedComplete' && stop.abort(new Error('p1 stops')),
      }),
      /p1 stops/,
    );
    assert.ok(first.includes('union'), first.join(', '));
    // Every masked vector is in: the job waits for the unmask responses, p1's among them.
    await until('UNMASK', async () =>
      (await admin.getJob(job.id)).securePhase === SecurePhase.SECURE_PHASE_UNMASK ? true : undefined,
    );
    const calls = await getSupportCalls();
    // The metric counts downloads: each party fetched U once (more only if a transient failure made one retry).
    assert.ok(calls - calls0 >= 3, `${calls - calls0} GetSupport calls`);

    // p1's folder as a crash right after the server recorded its vector leaves it: the party never saved that the
    // vector is complete (nor its clipped count), and its copy of U is still there.
    const st = await loadParty(work('p1'), job.id, 'p1');
    assert.equal(st.maskedComplete, true);
    delete st.maskedComplete;
    delete st.clipped;
    await saveParty(work('p1'), st);
    await writeFile(join(work('p1'), 'union.bin'), Buffer.alloc(64, 7));

    // Run again: the server says the vector is whole, so U is neither downloaded nor kept; p1 stops there again.
    const second: string[] = [];
    const stop2 = new AbortController();
    await assert.rejects(
      push(h.address, job.id, 'p1', tokens.p1!, 0, {
        signal: stop2.signal,
        steps: second,
        onSecure: (p) => p.step === 'maskedComplete' && stop2.abort(new Error('p1 stops again')),
      }),
      /p1 stops again/,
    );
    assert.equal(await getSupportCalls(), calls, 'no GetSupport call for the resumed vector');
    assert.ok(second.includes('maskedComplete') && !second.includes('union'), second.join(', '));
    assert.deepEqual(await unionFiles(work('p1')), []);
    assert.equal((await loadParty(work('p1'), job.id, 'p1')).maskedComplete, true);

    // Run a third time (the state now says complete): straight to the unmask round; the job merges.
    const third: string[] = [];
    await push(h.address, job.id, 'p1', tokens.p1!, 0, { steps: third });
    assert.ok(third.includes('unmasked') && !third.includes('union'), third.join(', '));
    await Promise.all(others);
    assert.equal(await getSupportCalls(), calls, 'no GetSupport call for the finished vector');
    for (const p of parties) assert.deepEqual(await unionFiles(work(p)), [], p);

    for await (const e of admin.watchJob(job.id)) if (e.merged !== undefined || e.failed !== undefined) break;
    const final = await admin.getJob(job.id);
    assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
    const out = join(dir, 'merged-resumed');
    await admin.pull({ jobId: job.id, out });
    await assertMatchesPlainMerge({
      base,
      merged: out,
      clip: CLIP,
      parties: await Promise.all(parties.map((p, i) => pushedParty(finetuned[i]!, work(p), job.id, p))),
    });
  });

  it('a push that ends in an error leaves no union.bin: stopped mid-upload, refused once the job failed', async () => {
    const parties = ['a', 'b'];
    const { job, tokens, work } = await secureJob(parties);
    const union = join(work('a'), 'union.bin');
    const b = push(h.address, job.id, 'b', tokens.b!, 1);
    b.catch(() => undefined);

    // a stops itself after its first masked chunk (U downloaded, in its folder).
    const stop = new AbortController();
    let had = false;
    await assert.rejects(
      push(h.address, job.id, 'a', tokens.a!, 0, {
        signal: stop.signal,
        onSecure: (p) => {
          if (p.step === 'union') had = existsSync(union);
          if (p.step === 'masked') stop.abort(new Error('a stops mid-upload'));
        },
      }),
      /a stops mid-upload/,
    );
    assert.ok(had, 'union.bin was there while a coded its vector');
    assert.deepEqual(await unionFiles(work('a')), []);

    // Run again through a proxy that holds a's bytes as soon as it has U again: the job is cancelled meanwhile
    // (its masked data discarded), so the server refuses a's masked upload when its calls go through.
    const proxy = await SlowProxy.start(h.address, Infinity);
    try {
      let gotUnion!: () => void;
      const holding = new Promise<void>((resolve) => (gotUnion = resolve));
      had = false;
      const again = push(proxy.address, job.id, 'a', tokens.a!, 0, {
        onSecure: (p) => {
          if (p.step !== 'union') return;
          had = existsSync(union);
          proxy.hold();
          gotUnion();
        },
      });
      again.catch(() => undefined);
      await holding;
      await admin.cancelJob(job.id, 'cancelled under a party');
      await access(join(dir, 'data', 'jobs', job.id, 'secure', 'discarded'));
      proxy.release();
      await assert.rejects(again, (err: unknown) => {
        assert.ok(err instanceof DppaRpcError, String(err));
        assert.equal(err.code, status.FAILED_PRECONDITION, err.message);
        return true;
      });
      assert.ok(had, 'union.bin was there when the job failed');
      assert.deepEqual(await unionFiles(work('a')), []);
    } finally {
      await proxy.close();
    }
    // b, wherever the failure met it, keeps no copy of U either.
    await assert.rejects(b);
    assert.deepEqual(await unionFiles(work('b')), []);
    assert.equal((await admin.getJob(job.id)).state, JobState.JOB_STATE_FAILED);
  });
});
