/**
 * Stopping the server: a graceful stop waits for open calls (up to the grace
 * period); a second stop that is not graceful cuts them off at once.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status, type ServiceError } from '@grpc/grpc-js';
import { ADMIN, auth, call, startHarness } from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-stop-'));
  base = (await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 7 })).base;
});
after(() => rm(dir, { recursive: true, force: true }));

describe('stopping the server', () => {
  // Without the second stop the graceful one would wait the whole hour of grace: the test would hit its timeout.
  it('a second, not graceful, stop cuts off open calls at once', { timeout: 120_000 }, async () => {
    const h = await startHarness(join(dir, 'data'), { shutdownGraceMs: 3_600_000 });
    const created = await call(
      h.jobs,
      'createJob',
      {
        basePath: base,
        parties: ['a', 'b'],
        rate: 0.8,
        method: 'dp',
        label: '',
        dpa: undefined,
        merge: undefined,
        maxAbsValue: 0,
        pruneMethod: 0,
        privacy: 0,
        threshold: 0,
        clipBound: 0,
        securePhaseSeconds: 0,
      },
      ADMIN,
    );
    const jobId = created.job!.id;
    // An upload left open, as a client that froze would leave it.
    let stream: ReturnType<typeof h.uploads.upload> | undefined;
    const ended = new Promise<ServiceError | null>((resolve) => {
      stream = h.uploads.upload(auth(created.tokens.a!), (err) => resolve(err));
    });
    stream!.write({ open: { jobId, party: 'a' } });
    for (let i = 0; i < 200 && (await uploadsActive(h.server.metricsPort)) !== 1; i++)
      await new Promise((r) => setTimeout(r, 20));
    assert.equal(await uploadsActive(h.server.metricsPort), 1, 'the upload is open');

    const graceful = h.server.stop();
    let stopped = false;
    void graceful.then(() => (stopped = true));
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(stopped, false, 'the graceful stop waits for the open upload');
    const atOnce = h.server.stop({ graceful: false });
    await atOnce;
    await graceful;
    assert.equal((await ended)?.code, status.UNAVAILABLE, 'the open upload was cut off');
    for (const c of [h.jobs, h.uploads, h.downloads, h.health]) c.close();
  });
});

async function uploadsActive(metricsPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  return Number(/^dppa_uploads_active (\S+)$/m.exec(text)?.[1]);
}
