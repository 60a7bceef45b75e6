/**
 * What `dppa serve` prints: JSON lines only (its log, on stderr), each with a
 * level, a time and a message; each RPC's lines carry its job and party; no
 * token ever appears.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials } from '@grpc/grpc-js';
import { JobServiceClient } from '../proto/gen/dppa/v1/jobs.js';
import { UploadServiceClient } from '../proto/gen/dppa/v1/upload.js';
import { ADMIN, call } from './fixtures/grpc-harness.js';
import { serveFailure, startServe } from './fixtures/serve-process.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-log-'));
  base = (await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 31 })).base;
});
after(() => rm(dir, { recursive: true, force: true }));

type Line = Record<string, unknown>;

describe('the server log', () => {
  it('is JSON lines with level, time and message; RPC lines carry job and party, never a token', async () => {
    const s = await startServe(
      ['--data', join(dir, 'data'), '--grpc-port', '0', '--metrics-port', '0', '--log-level', 'debug'],
      { DPPA_ADMIN_TOKEN: ADMIN },
    );
    const jobs = new JobServiceClient(s.address, credentials.createInsecure());
    const uploads = new UploadServiceClient(s.address, credentials.createInsecure());
    let tokens: Record<string, string>;
    let jobId: string;
    try {
      const created = await call(
        jobs,
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
      jobId = created.job!.id;
      tokens = created.tokens;
      await call(uploads, 'getUploadState', { jobId, party: 'a' }, tokens.a!);
      await assert.rejects(
        call(jobs, 'getJob', { jobId: 'no-such-job' }, tokens.b!),
        /PERMISSION_DENIED|token is not valid/,
      );
    } finally {
      jobs.close();
      uploads.close();
    }
    assert.equal(await s.stop(), 0);
    const text = s.stderr();
    const lines = text
      .trim()
      .split('\n')
      .map((l, i) => {
        try {
          return JSON.parse(l) as Line;
        } catch {
          assert.fail(`line ${i + 1} is not JSON: ${l}`);
        }
      });
    for (const l of lines) {
      assert.ok(['debug', 'info', 'warn', 'error'].includes(l.level as string), JSON.stringify(l));
      assert.ok(typeof l.time === 'string' && !Number.isNaN(Date.parse(l.time)), JSON.stringify(l));
      assert.equal(typeof l.msg, 'string', JSON.stringify(l));
    }
    const rpc = (method: string): Line | undefined => lines.find((l) => l.rpc === method);
    assert.deepEqual(
      pick(rpc('dppa.v1.UploadService/GetUploadState')),
      { level: 'debug', msg: 'rpc', jobId, party: 'a', code: 'OK' },
      'a party call: its job and party',
    );
    assert.deepEqual(
      pick(rpc('dppa.v1.JobService/GetJob')),
      { level: 'info', msg: 'rpc failed', jobId: 'no-such-job', party: 'b', code: 'PERMISSION_DENIED' },
      'a refused call: the job asked for and the party of the token',
    );
    assert.equal(pick(rpc('dppa.v1.JobService/CreateJob')).code, 'OK');
    assert.ok(
      lines.some((l) => typeof l.msg === 'string' && l.msg.startsWith('grpc listening on ') && l.grpc === s.address),
    );
    assert.ok(lines.some((l) => typeof l.msg === 'string' && /SIGTERM, stopping/.test(l.msg)));
    for (const secret of [ADMIN, ...Object.values(tokens)]) assert.ok(!text.includes(secret), 'no token in the log');
  });

  it('never shows the user, password or token of a NATS URL', async () => {
    // Port 1 refuses connections: the server cannot reach NATS, says so and exits 1.
    const r = await serveFailure(
      [
        '--data',
        join(dir, 'data-nats'),
        '--grpc-port',
        '0',
        '--metrics-port',
        '0',
        '--nats',
        'nats://s3cret@127.0.0.1:1',
      ],
      {
        DPPA_ADMIN_TOKEN: ADMIN,
      },
    );
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /127\.0\.0\.1:1/, 'the URL is named');
    assert.ok(!r.stderr.includes('s3cret'), r.stderr);
  });
});

function pick(l: Line | undefined): Line {
  assert.ok(l !== undefined, 'the call has a log line');
  const { level, msg, jobId, party, code } = l;
  return Object.fromEntries(Object.entries({ level, msg, jobId, party, code }).filter(([, v]) => v !== undefined));
}
