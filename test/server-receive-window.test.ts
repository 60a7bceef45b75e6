/**
 * The server's HTTP/2 receive window, seen from a plain Node HTTP/2 client:
 * what the server advertises for each stream (SETTINGS_INITIAL_WINDOW_SIZE)
 * and how much the client may send on the connection before the server reads.
 * Fails if a grpc-js upgrade stops server/rpc/receive-window.ts from reaching
 * the HTTP/2 sessions.
 */
import assert from 'node:assert/strict';
import { connect, type ClientHttp2Session } from 'node:http2';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { ConfigError } from '../server/errors.js';
import { withDefaults } from '../server/config.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';

/** Opens an HTTP/2 connection and waits until the server's settings and first window update have arrived. */
async function windows(address: string): Promise<{ stream: number; connection: number }> {
  const session: ClientHttp2Session = connect(`http://${address}`);
  try {
    await new Promise<void>((resolve, reject) => {
      session.once('remoteSettings', () => resolve());
      session.once('error', reject);
    });
    // The connection's WINDOW_UPDATE follows the SETTINGS frame; a ping round trip makes sure it has been read.
    await new Promise<void>((resolve, reject) => session.ping((err) => (err === null ? resolve() : reject(err))));
    return { stream: session.remoteSettings.initialWindowSize!, connection: session.state.remoteWindowSize! };
  } finally {
    session.destroy();
  }
}

describe('HTTP/2 receive window', () => {
  const dirs: string[] = [];
  const harnesses: Harness[] = [];
  const start = async (opts: { receiveWindowBytes?: number }): Promise<Harness> => {
    const dir = await mkdtemp(join(tmpdir(), 'dppa-window-'));
    dirs.push(dir);
    const h = await startHarness(dir, opts);
    harnesses.push(h);
    return h;
  };
  after(async () => {
    for (const h of harnesses) await h.close();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  it('is 4 MiB for the connection and each stream by default', async () => {
    const h = await start({});
    assert.deepEqual(await windows(h.address), { stream: 4 * 1024 * 1024, connection: 4 * 1024 * 1024 });
  });

  it('follows receiveWindowBytes, and stays at the protocol default when asked for it', async () => {
    const wide = await start({ receiveWindowBytes: 1 << 20 });
    assert.deepEqual(await windows(wide.address), { stream: 1 << 20, connection: 1 << 20 });
    const narrow = await start({ receiveWindowBytes: 65_535 });
    assert.deepEqual(await windows(narrow.address), { stream: 65_535, connection: 65_535 });
  });

  it('refuses a window HTTP/2 cannot advertise', () => {
    for (const bad of [0, 65_534, 2 ** 31, 1.5]) {
      assert.throws(
        () => withDefaults({ adminToken: ADMIN, receiveWindowBytes: bad }),
        (e: unknown) => e instanceof ConfigError && /receiveWindowBytes/.test(e.message),
      );
    }
  });
});
