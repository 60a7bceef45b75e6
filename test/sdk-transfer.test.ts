/**
 * The SDK's gRPC paths against an in-test server (test/fixtures/fake-dppa-server.ts)
 * that fails a stream once mid-way: push resumes and sends only the missing
 * tensors, pull resumes from an offset and verifies every file, watchJob
 * reconnects from the last event and cancels its call when the reader stops.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { getEventListeners } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import {
  DeltaMismatchError,
  DownloadError,
  DppaClient,
  DppaRpcError,
  JobStateError,
  pruneToFile,
  type DppaClientOptions,
  type PushProgress,
} from '../client/index.js';
import { JobState, type JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import { CuttingProxy } from './fixtures/cutting-proxy.js';
import { FakeDppaServer, type FakeServerOptions } from './fixtures/fake-dppa-server.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const TENSORS = 2 + TINY.layers * 9 + 1;
const fastRetry = { attempts: 3, initialDelayMs: 1, maxDelayMs: 5 };

let dir: string;
let base: string;
let ft: string;
let deltaFile: string;
/** A delta (about 2 MB) larger than what HTTP/2 flow control and grpc-js's buffers hold. */
let bigDelta: string;
let bigTensors: number;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-sdk-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 11 });
  base = fam.base;
  ft = fam.finetuned[0]!;
  deltaFile = join(dir, 'ft.dppa');
  await pruneToFile({ base, finetuned: ft, rate: 0.9, out: deltaFile, workers: 1 });
  const shape = { layers: 2, hidden: 256, intermediate: 688, vocab: 512 };
  const big = await writeLlamaFamily(join(dir, 'big'), { shape, seed: 3 });
  bigDelta = join(dir, 'big.dppa');
  bigTensors = 2 + shape.layers * 9 + 1;
  await pruneToFile({ base: big.base, finetuned: big.finetuned[0]!, rate: 0.5, out: bigDelta, workers: 1 });
});
after(() => rm(dir, { recursive: true, force: true }));

/** Runs `fn` with a fresh fake server and a client of it; stops both after. */
async function withServer<T>(
  opts: FakeServerOptions,
  fn: (s: FakeDppaServer, c: DppaClient) => Promise<T>,
  client: Partial<DppaClientOptions> = {},
): Promise<T> {
  const server = await FakeDppaServer.start(opts);
  const c = new DppaClient({ address: server.address, token: 'party-token', retry: fastRetry, ...client });
  try {
    return await fn(server, c);
  } finally {
    c.close();
    server.stop();
  }
}

describe('push', () => {
  it('resumes after a dropped stream and sends only the tensors the server lacks (pruning on the fly)', async () => {
    await withServer({ dropUploadAfterTensors: 5 }, async (server, client) => {
      const progress: PushProgress[] = [];
      const signal = new AbortController().signal;
      // Two worker threads: the tensors pruned ahead for the dropped stream are abandoned and pruned again.
      const state = await client.push(
        { jobId: 'job-1', party: 'a', base, finetuned: ft, workers: 2 },
        { signal, onProgress: (p) => progress.push(p) },
      );
      assert.equal(getEventListeners(signal, 'abort').length, 0, "no listener left on the caller's signal");
      assert.equal(state.complete, true);
      assert.equal(state.tensorsReceived.length, TENSORS);
      assert.equal(server.uploads.length, 2, 'one stream dropped, one resumed');
      const [first, second] = server.uploads as [(typeof server.uploads)[0], (typeof server.uploads)[0]];
      assert.ok(first.headerFirst && second.headerFirst, 'every stream starts with the open and the header');
      assert.equal(first.ended.length, 5);
      // The resumed stream sends every tensor not held, and none that was.
      assert.deepEqual(new Set(second.begun), new Set(server.held.get('a')!.filter((t) => !first.ended.includes(t))));
      for (const t of first.ended) assert.ok(!second.begun.includes(t), `${t} was sent again`);
      assert.equal(first.ended.length + second.ended.length, TENSORS);
      const uploads = progress.filter((p) => p.phase === 'upload');
      assert.ok(
        progress.some((p) => p.phase === 'prepare'),
        'the significance pass is reported',
      );
      assert.equal(uploads.at(-1)!.tensorsDone, TENSORS);
      assert.equal(uploads.at(-1)!.attempt, 2);
      assert.ok(uploads.at(-1)!.bytesSent > 0);
      // Nothing left to do: a second push asks and returns without a stream.
      const again = await client.push({ jobId: 'job-1', party: 'a', base, finetuned: ft, workers: 1 });
      assert.equal(again.complete, true);
      assert.equal(server.uploads.length, 2);
    });
  });

  it('resumes a .dppa file upload the same way', async () => {
    await withServer({ dropUploadAfterTensors: 7 }, async (server, client) => {
      const state = await client.push({ jobId: 'job-1', party: 'b', delta: deltaFile });
      assert.equal(state.complete, true);
      const [first, second] = server.uploads as [(typeof server.uploads)[0], (typeof server.uploads)[0]];
      assert.equal(server.uploads.length, 2);
      assert.equal(first.ended.length, 7);
      assert.equal(second.begun.length, TENSORS - 7);
      for (const t of first.ended) assert.ok(!second.begun.includes(t));
    });
  });

  it('waits for the server when it reads slowly (backpressure) instead of buffering the delta', async () => {
    let doneAtResume = -1;
    let tensorsDone = 0;
    const opts: FakeServerOptions = {
      job: { rate: 0.5 },
      pauseUploadMs: 400,
      onUploadResume: () => (doneAtResume = tensorsDone),
    };
    await withServer(opts, async (_server, client) => {
      const state = await client.push(
        { jobId: 'job-1', party: 'a', delta: bigDelta },
        { onProgress: (p) => (tensorsDone = p.tensorsDone) },
      );
      assert.equal(state.complete, true);
      assert.ok(
        doneAtResume >= 0 && doneAtResume < bigTensors / 2,
        `${doneAtResume} of ${bigTensors} tensors written while the server was not reading`,
      );
    });
  });

  it('ends at its time limit with DEADLINE_EXCEEDED', async () => {
    await withServer({ job: { rate: 0.5 }, pauseUploadMs: 1000 }, async (_server, client) => {
      await assert.rejects(
        client.push({ jobId: 'job-1', party: 'a', delta: bigDelta }, { timeoutMs: 200 }),
        (e: unknown) => {
          assert.ok(e instanceof DppaRpcError);
          assert.equal(e.code, status.DEADLINE_EXCEEDED);
          assert.equal(e.message, 'Upload failed: no result within the time limit of 200 ms (DEADLINE_EXCEEDED)');
          return true;
        },
      );
    });
  });

  it('resumes after the network connection is cut under the stream', async () => {
    const server = await FakeDppaServer.start({ job: { rate: 0.5 } });
    const proxy = await CuttingProxy.start(server.address, Math.round((await stat(bigDelta)).size / 2), 'up');
    const client = new DppaClient({ address: proxy.address, token: 'party-token', retry: fastRetry });
    try {
      const state = await client.push({ jobId: 'job-1', party: 'a', delta: bigDelta });
      assert.equal(state.complete, true);
      assert.equal(proxy.cuts, 1);
      assert.equal(server.uploads.length, 2);
      const [first, second] = server.uploads as [(typeof server.uploads)[0], (typeof server.uploads)[0]];
      assert.ok(
        first.ended.length > 0 && first.ended.length < bigTensors,
        `${first.ended.length} tensors before the cut`,
      );
      for (const t of first.ended) assert.ok(!second.begun.includes(t), `${t} was sent again`);
      assert.equal(new Set([...first.ended, ...second.ended]).size, bigTensors);
    } finally {
      client.close();
      await proxy.close();
      server.stop();
    }
  });

  it('refuses a delta that does not fit the job, before sending anything', async () => {
    await withServer({ job: { rate: 0.8 } }, async (server, client) => {
      await assert.rejects(client.push({ jobId: 'job-1', party: 'a', delta: deltaFile }), (e: unknown) => {
        assert.ok(e instanceof DeltaMismatchError);
        assert.equal(e.field, 'rate');
        assert.match(e.message, /pruned at rate 0\.9; job job-1 requires 0\.8/);
        return true;
      });
      await assert.rejects(
        client.push({ jobId: 'job-1', party: 'a', base, finetuned: ft, rate: 0.9 }),
        DeltaMismatchError,
      );
      assert.equal(server.uploads.length, 0);
    });
    await withServer({ job: { baseFingerprint: 'another-base' } }, async (server, client) => {
      await assert.rejects(
        client.push({ jobId: 'job-1', party: 'a', base, finetuned: ft, workers: 1 }),
        (e: unknown) => e instanceof DeltaMismatchError && e.field === 'baseFingerprint',
      );
      assert.equal(server.uploads.length, 0);
    });
  });

  it('refuses to push to a failed job', async () => {
    await withServer(
      { job: { state: JobState.JOB_STATE_FAILED, failureReason: 'cancelled by admin' } },
      async (_server, client) => {
        await assert.rejects(client.push({ jobId: 'job-1', party: 'a', delta: deltaFile }), (e: unknown) => {
          assert.ok(e instanceof JobStateError);
          assert.match(e.message, /job job-1 is failed \(cancelled by admin\)/);
          return true;
        });
      },
    );
  });

  it("stops at once when its signal aborts, with the signal's reason", async () => {
    await withServer({}, async (server, client) => {
      const controller = new AbortController();
      const p = client.push(
        { jobId: 'job-1', party: 'a', delta: deltaFile },
        { signal: controller.signal, onProgress: (p) => p.tensorsDone === 3 && controller.abort() },
      );
      await assert.rejects(p, { name: 'AbortError' });
      assert.ok((server.held.get('a')?.length ?? 0) < TENSORS);
    });
  });

  it("gives up after the configured attempts without progress, with the server's error", async () => {
    await withServer(
      { dropUploadAfterTensors: 0 },
      async (_server, client) => {
        // The fake drops only once; one attempt in all means no retry.
        await assert.rejects(client.push({ jobId: 'job-1', party: 'a', delta: deltaFile }), (e: unknown) => {
          assert.ok(e instanceof DppaRpcError);
          assert.equal(e.code, status.UNAVAILABLE);
          assert.equal(e.method, 'Upload');
          assert.equal(e.message, 'Upload failed: dropped by the test (UNAVAILABLE)');
          return true;
        });
      },
      { retry: { attempts: 1 } },
    );
  });
});

describe('pull', () => {
  const fileA = Buffer.from(Array.from({ length: 5500 }, (_, i) => (i * 7) % 251));
  const fileB = Buffer.from(Array.from({ length: 2100 }, (_, i) => (i * 13) % 251));
  const files = [
    { path: 'model.safetensors', data: fileA },
    { path: 'sub/config.json', data: fileB },
  ];

  it('resumes a dropped download from the bytes on disk and renames the folder when verified', async () => {
    await withServer({ files, dropDownloadAfterChunks: 2 }, async (server, client) => {
      const out = join(dir, 'pulled-1');
      const signal = new AbortController().signal;
      const result = await client.pull({ jobId: 'job-1', out }, { signal, timeoutMs: 60_000 });
      assert.equal(getEventListeners(signal, 'abort').length, 0, "no listener left on the caller's signal");
      assert.deepEqual(await readFile(join(out, 'model.safetensors')), fileA);
      assert.deepEqual(await readFile(join(out, 'sub', 'config.json')), fileB);
      assert.deepEqual(
        server.downloads.filter((d) => d.path === 'model.safetensors').map((d) => d.offset),
        [0, 2000],
        'the second request starts where the first stopped',
      );
      assert.equal(result.bytesDownloaded, fileA.length + fileB.length);
      assert.equal(result.files[0]!.sha256, createHash('sha256').update(fileA).digest('hex'));
      assert.equal(existsSync(`${out}.tmp-job-1`), false);
    });
  });

  it('resumes from an offset after the network connection is cut under the stream', async () => {
    const large = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 31) % 253));
    const server = await FakeDppaServer.start({
      files: [{ path: 'model.safetensors', data: large }],
      chunkBytes: 16_384,
    });
    const proxy = await CuttingProxy.start(server.address, 100_000, 'down');
    const client = new DppaClient({ address: proxy.address, token: 'admin-token', retry: fastRetry });
    try {
      const out = join(dir, 'pulled-cut');
      await client.pull({ jobId: 'job-1', out });
      assert.deepEqual(await readFile(join(out, 'model.safetensors')), large);
      assert.equal(proxy.cuts, 1);
      const offsets = server.downloads.map((d) => d.offset);
      assert.equal(offsets.length, 2);
      assert.ok(offsets[1]! > 0 && offsets[1]! % 16_384 === 0, `resumed at ${offsets[1]}`);
    } finally {
      client.close();
      await proxy.close();
      server.stop();
    }
  });

  it('fetches a chunk again when its CRC does not match', async () => {
    await withServer({ files, corruptOneChunk: true }, async (server, client) => {
      const out = join(dir, 'pulled-2');
      await client.pull({ jobId: 'job-1', out });
      assert.deepEqual(await readFile(join(out, 'model.safetensors')), fileA);
      assert.deepEqual(
        server.downloads.filter((d) => d.path === 'model.safetensors').map((d) => d.offset),
        [0, 1000],
      );
    });
  });

  it('resumes from a partial file left by an earlier run', async () => {
    await withServer({ files }, async (server, client) => {
      const out = join(dir, 'pulled-3');
      await mkdir(`${out}.tmp-job-1`, { recursive: true });
      await writeFile(join(`${out}.tmp-job-1`, 'model.safetensors'), fileA.subarray(0, 3000));
      await writeFile(join(`${out}.tmp-job-1`, 'stray.bin'), 'not part of the checkpoint');
      const result = await client.pull({ jobId: 'job-1', out });
      assert.equal(result.bytesResumed, 3000);
      assert.deepEqual(
        server.downloads.find((d) => d.path === 'model.safetensors'),
        { path: 'model.safetensors', offset: 3000 },
      );
      assert.deepEqual(await readFile(join(out, 'model.safetensors')), fileA);
      assert.deepEqual((await readdir(out)).sort(), ['model.safetensors', 'sub']);
    });
  });

  it('fails with DownloadError and leaves no folder when a file does not match its SHA-256', async () => {
    const bad = [{ path: 'model.safetensors', data: fileA, sha256: 'ab'.repeat(32) }];
    await withServer({ files: bad }, async (server, client) => {
      const out = join(dir, 'pulled-4');
      await assert.rejects(client.pull({ jobId: 'job-1', out }), (e: unknown) => {
        assert.ok(e instanceof DownloadError);
        assert.match(e.message, /^model\.safetensors: SHA-256 is [0-9a-f]{64}, the server listed (ab){32}/);
        return true;
      });
      assert.equal(existsSync(out), false);
      assert.equal(server.downloads.length, 2, 'downloaded once more from the start before giving up');
    });
  });

  it('refuses unsafe paths and an existing output folder', async () => {
    await withServer({ files: [{ path: '../evil', data: fileB }] }, async (_server, client) => {
      await assert.rejects(
        client.pull({ jobId: 'job-1', out: join(dir, 'pulled-5') }),
        (e: unknown) => e instanceof DownloadError && /unsafe path/.test(e.message),
      );
      await assert.rejects(
        client.pull({ jobId: 'job-1', out: dir }),
        (e: unknown) => e instanceof RangeError && /^out: .* already exists/.test(e.message),
      );
    });
  });
});

describe('jobs', () => {
  const events: JobEvent[] = [1, 2, 3, 4, 5].map((i) => ({
    jobId: 'job-1',
    seq: BigInt(i),
    time: '',
    partyJoined: { party: `p${i}` },
  }));

  it('watchJob reconnects from the last event after a drop and ends with the stream', async () => {
    await withServer({ events, dropWatchAfterEvents: 2 }, async (server, client) => {
      const seen: bigint[] = [];
      for await (const ev of client.watchJob('job-1')) seen.push(ev.seq);
      assert.deepEqual(seen, [1n, 2n, 3n, 4n, 5n]);
      assert.deepEqual(
        server.watches.map((w) => w.afterSeq),
        [0n, 2n],
      );
    });
  });

  it('watchJob cancels the call when the reader breaks or the signal aborts', async () => {
    await withServer({ events, holdWatchOpen: true }, async (server, client) => {
      for await (const ev of client.watchJob('job-1', { afterSeq: 1n })) {
        if (ev.seq === 3n) break;
      }
      const controller = new AbortController();
      const seen: bigint[] = [];
      await assert.rejects(
        async () => {
          for await (const ev of client.watchJob('job-1', { signal: controller.signal })) {
            seen.push(ev.seq);
            if (ev.seq === 5n) controller.abort();
          }
        },
        { name: 'AbortError' },
      );
      assert.deepEqual(seen, [1n, 2n, 3n, 4n, 5n]);
      assert.equal(getEventListeners(controller.signal, 'abort').length, 0, "no listener left on the caller's signal");
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(
        server.watches.map((w) => w.cancelled),
        [true, true],
      );
    });
  });

  it("turns statuses into DppaRpcError with the server's message", async () => {
    await withServer({}, async (_server, client) => {
      await assert.rejects(client.getJob('nope'), (e: unknown) => {
        assert.ok(e instanceof DppaRpcError);
        assert.equal(e.code, status.NOT_FOUND);
        assert.equal(e.message, 'GetJob failed: job "nope" not found (NOT_FOUND)');
        return true;
      });
      const { job, tokens } = await client.createJob({
        basePath: '/srv/base',
        parties: ['a', 'b'],
        rate: 0.9,
        dpa: { fixed: { factors: [1.2, 1] } },
        merge: { weights: { a: 1, b: 0.5 } },
      });
      assert.equal(job.id, 'job-1');
      assert.deepEqual(tokens, { a: 'token-a', b: 'token-b' });
      assert.equal((await client.listJobs()).length, 1);
      assert.equal((await client.cancelJob('job-1', 'stop')).failureReason, 'stop');
    });
    await withServer(
      {},
      async (_server, client) => {
        await assert.rejects(client.listJobs(), {
          name: 'DppaRpcError',
          code: status.UNAUTHENTICATED,
          message: 'ListJobs failed: invalid token (UNAUTHENTICATED)',
        });
      },
      { token: 'wrong' },
    );
  });

  it('retries UNAVAILABLE for calls that change nothing, then fails with it', async () => {
    const server = await FakeDppaServer.start();
    const address = server.address;
    server.stop();
    const client = new DppaClient({
      address,
      token: 't',
      retry: { attempts: 2, initialDelayMs: 1, maxDelayMs: 1 },
      timeoutMs: 5000,
    });
    try {
      await assert.rejects(
        client.getJob('job-1'),
        (e: unknown) => e instanceof DppaRpcError && e.code === status.UNAVAILABLE && e.method === 'GetJob',
      );
    } finally {
      client.close();
    }
  });
});
