/**
 * The client's connection policy: address parsing, loopback detection,
 * refusing plaintext to a remote address, TLS options, defaults; and a real
 * TLS connection to an in-test server with a certificate made by openssl.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ServerCredentials, status } from '@grpc/grpc-js';
import { DppaClient, DppaRpcError } from '../client/index.js';
import { isLoopbackHost, parseAddress, withDefaults } from '../client/sdk/connection.js';
import { FakeDppaServer } from './fixtures/fake-dppa-server.js';
import { haveOpenssl } from './fixtures/openssl.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-conn-'));
});
after(() => rm(dir, { recursive: true, force: true }));

describe('address and transport policy', () => {
  it('recognises loopback hosts only', () => {
    for (const h of [
      'localhost',
      'LOCALHOST',
      '127.0.0.1',
      '127.255.3.4',
      '::1',
      '[::1]',
      '0:0:0:0:0:0:0:1',
      '::ffff:127.0.0.1',
    ]) {
      assert.equal(isLoopbackHost(h), true, h);
    }
    for (const h of [
      '10.0.0.1',
      '128.0.0.1',
      '0.0.0.0',
      '::',
      '::2',
      'example.org',
      'localhost.example.org',
      'mylocalhost',
      '::ffff:10.0.0.1',
      '',
    ]) {
      assert.equal(isLoopbackHost(h), false, h);
    }
  });

  it('parses host:port and [v6]:port, naming the option when it is wrong', () => {
    assert.deepEqual(parseAddress('merge.example.org:50051'), { host: 'merge.example.org', port: 50051 });
    assert.deepEqual(parseAddress('127.0.0.1:1'), { host: '127.0.0.1', port: 1 });
    assert.deepEqual(parseAddress('[::1]:443'), { host: '::1', port: 443 });
    for (const bad of [
      'example.org',
      'example.org:',
      ':50051',
      'example.org:0',
      'example.org:65536',
      '::1:50051',
      '[example]:1',
      'http://x:1',
      'a b:1',
    ]) {
      assert.throws(
        () => parseAddress(bad),
        (e: unknown) => e instanceof RangeError && e.message.startsWith('address:'),
        bad,
      );
    }
  });

  it('refuses plaintext to a remote address unless insecure is set', () => {
    assert.throws(
      () => withDefaults({ address: 'merge.example.org:50051', token: 't' }),
      (e: unknown) => {
        assert.ok(e instanceof RangeError);
        assert.match(
          e.message,
          /^insecure: refusing plaintext to merge\.example\.org:50051, which is not a loopback address/,
        );
        return true;
      },
    );
    assert.throws(() => new DppaClient({ address: '10.1.2.3:50051', token: 't' }), RangeError);
    assert.equal(withDefaults({ address: 'merge.example.org:50051', token: 't', insecure: true }).insecure, true);
    assert.equal(withDefaults({ address: 'merge.example.org:50051', token: 't', tls: {} }).tls?.ca, undefined);
    for (const address of ['localhost:1', '127.0.0.1:50051', '[::1]:50051'])
      assert.equal(withDefaults({ address, token: 't' }).tls, undefined);
  });

  it('fills in defaults and checks every option by name', () => {
    const o = withDefaults({ address: 'localhost:50051', token: 'secret' });
    assert.equal(o.timeoutMs, 30_000);
    assert.deepEqual(o.retry, { forMs: 300_000, attempts: Infinity, initialDelayMs: 250, maxDelayMs: 10_000 });
    assert.equal(o.maxMessageBytes, 32 * 1024 * 1024);
    assert.deepEqual(withDefaults({ address: 'localhost:1', token: 't', retry: { attempts: 2, forMs: 0 } }).retry, {
      forMs: 0,
      attempts: 2,
      initialDelayMs: 250,
      maxDelayMs: 10_000,
    });
    const bad: [Parameters<typeof withDefaults>[0], RegExp][] = [
      [{ address: 'localhost:1', token: '' }, /^token: required/],
      [{ address: 'localhost:1', token: 'a\nb' }, /^token: must not contain line breaks/],
      [{ address: 'localhost:1', token: 't', timeoutMs: 0 }, /^timeoutMs:/],
      [{ address: 'localhost:1', token: 't', retry: { attempts: 0 } }, /^retry\.attempts:/],
      [{ address: 'localhost:1', token: 't', retry: { forMs: -1 } }, /^retry\.forMs:/],
      [{ address: 'localhost:1', token: 't', retry: { initialDelayMs: 100, maxDelayMs: 10 } }, /^retry\.maxDelayMs:/],
      [{ address: 'localhost:1', token: 't', maxMessageBytes: 10 }, /^maxMessageBytes:/],
      [
        { address: 'localhost:1', token: 't', tls: { cert: Buffer.from('x') } },
        /^tls\.cert and tls\.key: give both or neither/,
      ],
      [
        { address: 'localhost:1', token: 't', tls: { ca: join(dir, 'missing.pem') } },
        /^tls\.ca: cannot read .*missing\.pem/,
      ],
    ];
    for (const [opts, message] of bad)
      assert.throws(
        () => withDefaults(opts),
        (e: unknown) => e instanceof RangeError && message.test(e.message),
        message.source,
      );
  });

  it('fails calls on a closed client', async () => {
    const client = new DppaClient({ address: 'localhost:1', token: 't' });
    client.close();
    client.close();
    await assert.rejects(client.getJob('x'), /is closed/);
  });
});

describe('TLS', { skip: haveOpenssl() ? false : 'openssl is not installed' }, () => {
  it('connects with tls.ca (path or bytes) and serverName, and a plaintext client cannot', async () => {
    const key = join(dir, 'key.pem');
    const cert = join(dir, 'cert.pem');
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        key,
        '-out',
        cert,
        '-days',
        '1',
        '-subj',
        '/CN=dppa.test',
        '-addext',
        'subjectAltName=DNS:dppa.test',
      ],
      { stdio: 'ignore' },
    );
    const pem = await readFile(cert);
    const server = await FakeDppaServer.start({
      credentials: ServerCredentials.createSsl(null, [{ private_key: await readFile(key), cert_chain: pem }]),
    });
    try {
      for (const ca of [cert, pem]) {
        const client = new DppaClient({
          address: server.address,
          token: 'admin-token',
          tls: { ca, serverName: 'dppa.test' },
        });
        try {
          assert.equal((await client.getJob('job-1')).id, 'job-1');
        } finally {
          client.close();
        }
      }
      const plain = new DppaClient({
        address: server.address,
        token: 'admin-token',
        retry: { attempts: 1 },
        timeoutMs: 3000,
      });
      try {
        await assert.rejects(
          plain.getJob('job-1'),
          (e: unknown) => e instanceof DppaRpcError && e.code === status.UNAVAILABLE,
        );
      } finally {
        plain.close();
      }
    } finally {
      server.stop();
    }
  });
});
