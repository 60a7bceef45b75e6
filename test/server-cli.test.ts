import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials } from '@grpc/grpc-js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { JobServiceClient, JobState } from '../proto/gen/dppa/v1/jobs.js';
import { UploadServiceClient } from '../proto/gen/dppa/v1/upload.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { ADMIN, auth, call, pruneRecords, upload, uploadMessages } from './fixtures/grpc-harness.js';

const launcher = new URL('./fixtures/serve-cli.ts', import.meta.url).pathname;

interface Served {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
  grpc: string;
  metrics: string;
}

/** Runs `dppa serve` in a child process and waits for its two "listening" lines. */
async function serve(args: string[], env: NodeJS.ProcessEnv = { DPPA_ADMIN_TOKEN: ADMIN }): Promise<Served> {
  const child = spawn(process.execPath, ['--import', 'tsx', launcher, 'serve', ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  // Everything it prints is its log, JSON lines on stderr; the listening lines say where, in fields grpc and metrics.
  const lines = await new Promise<Record<string, unknown>[]>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
      if (/metrics listening on .*\n/.test(err))
        resolve(
          err
            .trim()
            .split('\n')
            .map((l) => JSON.parse(l) as Record<string, unknown>),
        );
    });
    void exited.then((code) => reject(new Error(`dppa serve exited with ${code} before listening:\n${err}`)));
  });
  const grpc = lines.find((l) => typeof l.msg === 'string' && l.msg.startsWith('grpc listening on '))?.grpc as
    string | undefined;
  const metrics = lines.find((l) => typeof l.msg === 'string' && l.msg.startsWith('metrics listening on '))?.metrics as
    string | undefined;
  assert.ok(
    grpc !== undefined &&
      /^127\.0\.0\.1:\d+$/.test(grpc) &&
      metrics !== undefined &&
      /^http:\/\/127\.0\.0\.1:\d+\/metrics$/.test(metrics),
    err,
  );
  return { child, stderr: () => err, exited, grpc, metrics };
}

/** Runs `dppa serve` expecting it to exit at once. */
function serveFails(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', launcher, 'serve', ...args], {
      env: { ...process.env, DPPA_ADMIN_TOKEN: '', ...env },
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (code) => resolve({ code, stderr }));
  });
}

let dir: string;
let base: string;
let records: DeltaRecord[];
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-server-cli-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 12 });
  base = fam.base;
  records = await pruneRecords({ base, finetuned: fam.finetuned[0]!, rate: 0.8 });
});
after(() => rm(dir, { recursive: true, force: true }));

describe('dppa serve', () => {
  it('prints help, and refuses to start without an admin token or with plaintext on a public interface', async () => {
    const help = await serveFails(['--help'], {});
    assert.equal(help.code, 0);
    const noToken = await serveFails(['--grpc-port', '0'], {});
    assert.equal(noToken.code, 2);
    assert.match(noToken.stderr, /no admin token: set DPPA_ADMIN_TOKEN or pass --admin-token-file/);
    const tokenFile = join(dir, 'admin-token');
    await writeFile(tokenFile, `${ADMIN}\n`);
    const open = await serveFails(['--admin-token-file', tokenFile, '--grpc-host', '0.0.0.0', '--grpc-port', '0'], {});
    assert.equal(open.code, 2);
    assert.match(open.stderr, /0\.0\.0\.0 is not a loopback address.*--insecure/);
    const badPort = await serveFails(['--grpc-port', 'x'], { DPPA_ADMIN_TOKEN: ADMIN });
    assert.equal(badPort.code, 2);
    assert.match(badPort.stderr, /--grpc-port/);
  });

  it('survives SIGKILL mid-upload: completed tensors are kept, the half-received one is dropped; SIGTERM stops it cleanly', async () => {
    const data = join(dir, 'data');
    const args = ['--data', data, '--grpc-port', '0', '--metrics-port', '0'];
    let s = await serve(args);
    let jobs = new JobServiceClient(s.grpc, credentials.createInsecure());
    let uploads = new UploadServiceClient(s.grpc, credentials.createInsecure());
    const r = await call(
      jobs,
      'createJob',
      {
        basePath: base,
        parties: ['a'],
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
    const jobId = r.job!.id;
    const begins = records.flatMap((x, i) => (x.tensorBegin !== undefined ? [i] : []));
    await upload(uploads, r.tokens.a!, uploadMessages(jobId, 'a', records.slice(0, begins[1])));
    const stream = uploads.upload(auth(r.tokens.a!), () => undefined);
    for (const m of uploadMessages(jobId, 'a', [records[0]!, ...records.slice(begins[1], begins[1]! + 2)]))
      stream.write(m);
    const spool = join(data, 'jobs', jobId, 'uploads', 'a');
    for (let i = 0; i < 200 && !(await readdir(spool)).some((f) => f.includes('.tmp-')); i++)
      await new Promise((res) => setTimeout(res, 20));
    s.child.kill('SIGKILL');
    await s.exited;
    jobs.close();
    uploads.close();
    assert.ok(
      (await readdir(spool)).some((f) => f.includes('.tmp-')),
      'the kill left a partial tensor behind',
    );

    s = await serve([...args, '--keep-uploads']);
    jobs = new JobServiceClient(s.grpc, credentials.createInsecure());
    uploads = new UploadServiceClient(s.grpc, credentials.createInsecure());
    try {
      const state = await call(uploads, 'getUploadState', { jobId, party: 'a' }, r.tokens.a!);
      assert.deepEqual(state.tensorsReceived, [records[begins[0]!]!.tensorBegin!.name]);
      assert.deepEqual((await readdir(spool)).sort(), ['0.dppa', 'header.json']);
      const metrics = await (await fetch(s.metrics)).text();
      assert.match(metrics, /^dppa_jobs\{state="COLLECTING"\} 1$/m);
      // The rest (the tensor held is sent again, harmlessly); with --keep-uploads the merge leaves the tensors in place.
      const done = await upload(uploads, r.tokens.a!, uploadMessages(jobId, 'a', records));
      for (
        let i = 0;
        i < 250 && (await call(jobs, 'getJob', { jobId }, ADMIN)).state !== JobState.JOB_STATE_MERGED;
        i++
      )
        await new Promise((res) => setTimeout(res, 20));
      assert.equal((await call(jobs, 'getJob', { jobId }, ADMIN)).state, JobState.JOB_STATE_MERGED);
      assert.equal((await readdir(spool)).filter((f) => f.endsWith('.dppa')).length, done.tensorsExpected);
    } finally {
      jobs.close();
      uploads.close();
    }
    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.stderr());
    assert.match(s.stderr(), /SIGTERM, stopping/);
  });
});
