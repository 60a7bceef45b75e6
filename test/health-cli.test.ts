/**
 * `dppa health` as a process against real servers: a `dppa serve` process
 * (serving, per service, unknown service), a server over TLS (the connection
 * flags as every server command has them), a server that is stopping, and an
 * address where nothing listens.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CHILD_LIMITS } from './fixtures/child-limits.js';
import { freePort } from './fixtures/free-port.js';
import { auth, startHarness } from './fixtures/grpc-harness.js';
import { haveOpenssl, makeCa } from './fixtures/openssl.js';
import { metricValue, startServe, type ServeProcess } from './fixtures/serve-process.js';

const main = new URL('../client/cli/main.ts', import.meta.url).pathname;

/** Runs `dppa health ARGS` with no DPPA_* variable (it needs no token). */
function health(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DPPA_')));
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', main, 'health', ...args],
      { env: clean, ...CHILD_LIMITS },
      (err, stdout, stderr) => {
        resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
      },
    );
  });
}

let dir: string;
let serve: ServeProcess;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-health-'));
  serve = await startServe(['--data', join(dir, 'served'), '--grpc-port', '0', '--metrics-port', '0'], {
    DPPA_ADMIN_TOKEN: 'health-test-admin-token-0123',
  });
});
after(async () => {
  await serve.kill();
  await rm(dir, { recursive: true, force: true });
});

describe('dppa health', () => {
  it('exits 0 and prints SERVING for a running dppa serve, the whole server or one of its services', async () => {
    const [whole, upload, unknown] = await Promise.all([
      health(['--server', serve.address]),
      health(['--server', serve.address, '--service', 'dppa.v1.UploadService']),
      health(['--server', serve.address, '--service', 'no.such.Service']),
    ]);
    assert.deepEqual([whole.code, whole.stdout], [0, 'SERVING\n'], whole.stderr);
    assert.deepEqual([upload.code, upload.stdout], [0, 'SERVING\n'], upload.stderr);
    assert.equal(unknown.code, 1);
    assert.equal(unknown.stdout, '');
    assert.match(
      unknown.stderr,
      /^dppa health: Health\/Check failed: unknown service "no\.such\.Service" \(NOT_FOUND\)\n$/,
    );
  });

  it('exits 1 when nothing listens at the address, 2 for a bad command line', async () => {
    const port = await freePort();
    const [down, bad, remote] = await Promise.all([
      health(['--server', `127.0.0.1:${port}`, '--timeout-ms', '5000']),
      health(['--server', 'no-port']),
      health(['--server', 'merge.example.org:50051']),
    ]);
    assert.equal(down.code, 1);
    assert.match(down.stderr, /ECONNREFUSED.*\(UNAVAILABLE\)/);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--server: expected host:port/);
    assert.equal(remote.code, 2);
    assert.match(remote.stderr, /refusing plaintext to merge\.example\.org:50051/);
  });

  it('exits 1 for a server that is stopping (it lets an upload finish, and refuses new calls meanwhile)', async () => {
    const h = await startHarness(join(dir, 'stopping'), { shutdownGraceMs: 600_000 });
    const before = await health(['--server', h.address]);
    assert.equal(before.code, 0, before.stderr);
    // An upload left open (waiting for its first message) holds the graceful stop in its grace period until it is cancelled.
    const stream = h.uploads.upload(auth('a-party-token'), () => undefined);
    const started =
      'grpc_server_started_total{grpc_type="client_stream",grpc_service="dppa.v1.UploadService",grpc_method="Upload"}';
    while ((await metricValue(h.server.metricsPort, started)) < 1)
      await new Promise((resolve) => setTimeout(resolve, 20));
    let stopped = false;
    const stopping = h.close().then(() => (stopped = true));
    const during = await health(['--server', h.address]);
    assert.equal(stopped, false, 'the server was still stopping');
    stream.cancel();
    await stopping;
    assert.equal(during.code, 1);
    assert.equal(during.stdout, '');
    assert.match(during.stderr, /\(UNAVAILABLE\)/);
  });

  it(
    'speaks TLS with the connection flags of the server commands',
    { skip: !haveOpenssl() && 'openssl is not installed' },
    async () => {
      const ca = makeCa(dir, 'health');
      const cert = ca.issue('dppa.test', 'DNS:dppa.test');
      const h = await startHarness(join(dir, 'tls'), { tls: { certFile: cert.cert, keyFile: cert.key } });
      try {
        const [ok, plain, untrusted] = await Promise.all([
          health(['--server', h.address, '--tls-ca', ca.cert, '--tls-server-name', 'dppa.test']),
          health(['--server', h.address]),
          health(['--server', h.address, '--tls', '--tls-server-name', 'dppa.test', '--timeout-ms', '5000']),
        ]);
        assert.deepEqual([ok.code, ok.stdout], [0, 'SERVING\n'], ok.stderr);
        assert.equal(plain.code, 1, 'plaintext to a TLS server');
        assert.equal(untrusted.code, 1, 'a certificate Node does not trust');
      } finally {
        await h.close();
      }
    },
  );
});
