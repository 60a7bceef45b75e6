/**
 * Mutual TLS end to end: a real DppaServer with a server certificate and a
 * client CA, the SDK pushing two parties' deltas and pulling the merge over
 * TLS with client certificates; a client without a certificate, or with one
 * another CA signed, is refused. Certificates are made by openssl in the test.
 */
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { DppaClient, DppaRpcError, JobState, type DppaClientOptions } from '../client/index.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { haveOpenssl, makeCa, type CertFiles } from './fixtures/openssl.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

describe(
  'mutual TLS between the SDK and the server',
  { skip: haveOpenssl() ? false : 'openssl is not installed' },
  () => {
    let dir: string;
    let h: Harness;
    let fam: { base: string; finetuned: string[] };
    let tls: (who?: CertFiles) => NonNullable<DppaClientOptions['tls']>;
    let stranger: CertFiles;

    before(async () => {
      dir = await mkdtemp(join(tmpdir(), 'dppa-tls-'));
      fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 5, finetunes: 2 });
      const ca = makeCa(dir, 'parties');
      const server = ca.issue('dppa.test', 'DNS:dppa.test');
      const client = ca.issue('party-a');
      stranger = makeCa(dir, 'other').issue('intruder');
      tls = (who = client) => ({ ca: ca.cert, cert: who.cert, key: who.key, serverName: 'dppa.test' });
      h = await startHarness(join(dir, 'data'), {
        tls: { certFile: server.cert, keyFile: server.key, clientCaFile: ca.cert },
      });
    });
    after(async () => {
      await h?.close();
      await rm(dir, { recursive: true, force: true });
    });

    it('creates a job, takes two pushes, merges and serves the download over TLS', async () => {
      const address = `localhost:${h.server.grpcPort}`;
      const admin = new DppaClient({ address, token: ADMIN, tls: tls() });
      try {
        const { job, tokens } = await admin.createJob({
          basePath: fam.base,
          parties: ['a', 'b'],
          rate: 0.8,
          dpa: { fixed: { factors: [1.5, 1.2] } },
        });
        await Promise.all(
          ['a', 'b'].map(async (party, i) => {
            const c = new DppaClient({ address, token: tokens[party]!, tls: tls() });
            try {
              const state = await c.push({ jobId: job.id, party, base: fam.base, finetuned: fam.finetuned[i]! });
              assert.equal(state.complete, true);
            } finally {
              c.close();
            }
          }),
        );
        for await (const event of admin.watchJob(job.id)) assert.equal(event.failed, undefined);
        assert.equal((await admin.getJob(job.id)).state, JobState.JOB_STATE_MERGED);
        const pulled = await admin.pull({ jobId: job.id, out: join(dir, 'pulled') });
        const merged = await Checkpoint.open(pulled.out);
        const served = await Checkpoint.open(join(dir, 'data', 'jobs', job.id, 'merged'));
        try {
          for (const t of merged.tensors())
            assert.deepEqual(await merged.readRaw(t.name), await served.readRaw(t.name), t.name);
        } finally {
          await Promise.all([merged.close(), served.close()]);
        }
      } finally {
        admin.close();
      }
    });

    it('refuses a client without a certificate, with one another CA signed, or in plaintext', async () => {
      const address = `localhost:${h.server.grpcPort}`;
      const ca = await readFile(join(dir, 'parties-ca.pem'));
      const attempts: DppaClientOptions[] = [
        { address, token: ADMIN, tls: { ca, serverName: 'dppa.test' } },
        { address, token: ADMIN, tls: tls(stranger) },
        { address, token: ADMIN },
      ];
      for (const opts of attempts) {
        const c = new DppaClient({ ...opts, retry: { attempts: 1 }, timeoutMs: 5000 });
        try {
          await assert.rejects(
            c.listJobs(),
            (e: unknown) => e instanceof DppaRpcError && e.code === status.UNAVAILABLE,
          );
        } finally {
          c.close();
        }
      }
    });
  },
);
