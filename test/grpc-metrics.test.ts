/**
 * The server's Prometheus page: the grpc-ecosystem server metrics counted
 * exactly for calls of each kind (unary, client stream, server stream; OK and
 * failed), dppa_build_info, the data disk gauges, and `promtool check metrics`
 * clean for every family.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import type { CreateJobResponse } from '../proto/gen/dppa/v1/jobs.js';
import {
  ADMIN,
  auth,
  call,
  pruneRecords,
  rejectsWith,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from './fixtures/grpc-harness.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let h: Harness;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-grpc-metrics-'));
  h = await startHarness(join(dir, 'data'));
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** The page's samples, by series as written (`name{labels}`). */
async function scrape(): Promise<{ text: string; samples: Map<string, number> }> {
  const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
  const samples = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    samples.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return { text, samples };
}

/** The series name of a grpc-ecosystem metric with labels in the order prom-client writes them. */
function series(name: string, type: string, service: string, method: string, code?: string): string {
  return `${name}{grpc_type="${type}",grpc_service="${service}",grpc_method="${method}"${code === undefined ? '' : `,grpc_code="${code}"`}}`;
}

describe('gRPC server metrics', () => {
  it('count the calls of each kind, their messages and their codes', async () => {
    const check = (service: string): Promise<unknown> =>
      new Promise((resolve, reject) =>
        h.health.check({ service }, (err, res) => (err === null ? resolve(res) : reject(err))),
      );
    await check('');
    await check('dppa.v1.JobService');
    await rejectsWith(check('no.such.Service'), status.NOT_FOUND);

    const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 3, finetunes: 1 });
    const created: CreateJobResponse = await call(
      h.jobs,
      'createJob',
      {
        basePath: fam.base,
        parties: ['math'],
        rate: 0.8,
        method: 'dp',
        label: 'metrics',
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
    await rejectsWith(
      call(
        h.jobs,
        'createJob',
        {
          basePath: fam.base,
          parties: ['math'],
          rate: 0.8,
          method: 'dp',
          label: 'x',
          dpa: undefined,
          merge: undefined,
          maxAbsValue: 0,
          pruneMethod: 0,
          privacy: 0,
          threshold: 0,
          clipBound: 0,
          securePhaseSeconds: 0,
        },
        'not-the-admin-token-at-all',
      ),
      status.UNAUTHENTICATED,
    );
    const messages = uploadMessages(
      created.job!.id,
      'math',
      await pruneRecords({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.8 }),
    );
    await upload(h.uploads, created.tokens.math!, messages);

    // A watch of the job, read to its end (merged) or cut: either way one server stream, one request, ≥ 1 event sent.
    const events = await new Promise<number>((resolve, reject) => {
      let n = 0;
      const stream = h.jobs.watchJob({ jobId: created.job!.id, afterSeq: 0n }, auth(ADMIN));
      stream.on('data', () => n++);
      stream.on('error', reject);
      stream.on('end', () => resolve(n));
    });
    assert.ok(events >= 2);

    const { samples } = await scrape();
    const health = 'grpc.health.v1.Health';
    assert.equal(samples.get(series('grpc_server_started_total', 'unary', health, 'Check')), 3);
    assert.equal(samples.get(series('grpc_server_handled_total', 'unary', health, 'Check', 'OK')), 2);
    assert.equal(samples.get(series('grpc_server_handled_total', 'unary', health, 'Check', 'NotFound')), 1);
    assert.equal(samples.get(series('grpc_server_msg_received_total', 'unary', health, 'Check')), 3);
    assert.equal(
      samples.get(series('grpc_server_msg_sent_total', 'unary', health, 'Check')),
      2,
      'a failed call sends no message',
    );
    assert.equal(
      samples.get(`grpc_server_handling_seconds_count{grpc_type="unary",grpc_service="${health}",grpc_method="Check"}`),
      3,
    );

    const jobs = 'dppa.v1.JobService';
    assert.equal(samples.get(series('grpc_server_handled_total', 'unary', jobs, 'CreateJob', 'OK')), 1);
    assert.equal(samples.get(series('grpc_server_handled_total', 'unary', jobs, 'CreateJob', 'Unauthenticated')), 1);

    const up = 'dppa.v1.UploadService';
    assert.equal(samples.get(series('grpc_server_started_total', 'client_stream', up, 'Upload')), 1);
    assert.equal(samples.get(series('grpc_server_msg_received_total', 'client_stream', up, 'Upload')), messages.length);
    assert.equal(samples.get(series('grpc_server_msg_sent_total', 'client_stream', up, 'Upload')), 1);
    assert.equal(samples.get(series('grpc_server_handled_total', 'client_stream', up, 'Upload', 'OK')), 1);

    assert.equal(samples.get(series('grpc_server_msg_received_total', 'server_stream', jobs, 'WatchJob')), 1);
    assert.equal(samples.get(series('grpc_server_msg_sent_total', 'server_stream', jobs, 'WatchJob')), events);
    assert.equal(samples.get(series('grpc_server_handled_total', 'server_stream', jobs, 'WatchJob', 'OK')), 1);
    assert.equal(
      samples.get('dppa_upload_tensors_total'),
      messages.filter((m) => m.record?.tensorEnd !== undefined).length,
    );
  });

  it('say which build runs and how full the data disk is', async () => {
    const { samples } = await scrape();
    const pkg = JSON.parse(await readFile(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
    assert.equal(
      samples.get(`dppa_build_info{version="${pkg.version}",commit="unknown",node_version="${process.version}"}`),
      1,
    );
    const free = samples.get('dppa_data_disk_free_bytes')!;
    const size = samples.get('dppa_data_disk_size_bytes')!;
    assert.ok(free > 0 && size > free, `free ${free} of ${size}`);
  });

  it('pass promtool check metrics, every family', async () => {
    const { text } = await scrape();
    const families = new Set([...text.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]));
    for (const f of [
      'grpc_server_started_total',
      'grpc_server_handled_total',
      'grpc_server_handling_seconds',
      'grpc_server_msg_received_total',
      'grpc_server_msg_sent_total',
      'dppa_build_info',
      'dppa_dpa_domain_ratio',
      'dppa_dpa_evaluation_failures_total',
    ]) {
      assert.ok(families.has(f), f);
    }
    const out = await new Promise<{ code: number; output: string }>((resolve) => {
      const child = execFile('promtool', ['check', 'metrics'], (err, stdout, stderr) =>
        resolve({ code: err === null ? 0 : Number(err.code), output: stdout + stderr }),
      );
      child.stdin!.end(text);
    });
    assert.equal(out.output, '', `promtool check metrics:\n${out.output}`);
    assert.equal(out.code, 0);
  });
});
