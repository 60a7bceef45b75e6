import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager, StorageType } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import type { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { optionsFromFlags, withDefaults } from '../server/config.js';
import { ConfigError } from '../server/errors.js';
import { createLogger } from '../server/log.js';
import { DppaServer } from '../server/server.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { freePort } from './fixtures/free-port.js';
import { startNatsServer, type NatsServer } from './fixtures/nats-server.js';
import {
  ADMIN,
  call,
  pruneRecords,
  startHarness,
  upload,
  uploadMessages,
  watchAll,
  type Harness,
} from './fixtures/grpc-harness.js';

// The documented names (docs/events.md), written out here rather than imported, so that a change to them fails a test.
const STREAM = 'DPPA_EVENTS';
const KINDS = [
  'party_joined',
  'upload_progress',
  'upload_complete',
  'state_changed',
  'evaluation_done',
  'factors_chosen',
  'merge_progress',
  'merged',
  'failed',
  'party_stopped',
];

let dir: string;
let data: string;
let base: string;
const deltas = new Map<string, DeltaRecord[]>();
let nats: NatsServer;
let h: Harness;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-nats-events-'));
  data = join(dir, 'data');
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 31, finetunes: 2 });
  base = fam.base;
  deltas.set('math', await pruneRecords({ base, finetuned: fam.finetuned[0]!, rate: 0.8 }));
  deltas.set('law', await pruneRecords({ base, finetuned: fam.finetuned[1]!, rate: 0.8 }));
  nats = await startNatsServer();
  h = await startNatsHarness();
});
after(async () => {
  await h.close();
  await nats.close();
  await rm(dir, { recursive: true, force: true });
});

function startNatsHarness(): Promise<Harness> {
  return startHarness(data, { nats: { url: nats.url }, shutdownGraceMs: 500 });
}

async function createJob(): Promise<{ jobId: string; tokens: Record<string, string> }> {
  const r = await call(
    h.jobs,
    'createJob',
    {
      basePath: base,
      parties: ['math', 'law'],
      rate: 0.8,
      method: 'dp',
      label: 'nats',
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
  return { jobId: r.job!.id, tokens: r.tokens };
}

/** The records of a party's delta split after its first `n` tensors: header and those tensors, then header and the rest. */
function split(party: string, n: number): [DeltaRecord[], DeltaRecord[]] {
  const records = deltas.get(party)!;
  const begins = records.flatMap((r, i) => (r.tensorBegin !== undefined ? [i] : []));
  assert.ok(begins.length > n + 1);
  return [records.slice(0, begins[n]), [records[0]!, ...records.slice(begins[n])]];
}

/** The subject token of an event: its set field in snake_case. */
function kindOf(e: JobEvent): string {
  const field = Object.keys(JobEvent.toJSON(e) as object).find((k) => !['jobId', 'seq', 'time'].includes(k))!;
  return field.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** A value of the server's metrics endpoint (no labels). */
async function metric(name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line !== undefined, `metric ${name} is exported`);
  return Number(line.split(' ')[1]);
}

async function until(what: string, test: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await test()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail(`timed out waiting until ${what}`);
}

/** Runs a TypeScript file with node and tsx, as `npx tsx FILE ARGS` would; resolves once it exits. */
async function run(
  args: string[],
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  return { code, stdout, stderr };
}

interface Received {
  subject: string;
  msgId: string | undefined;
  payload: string;
}

/**
 * Reads a job's events from the stream as a subscriber would: a durable pull
 * consumer on `dppa.jobs.<jobId>.>`, a bounded number of messages in flight,
 * each acknowledged, until `merged` or `failed`. Also checks that nothing
 * follows it and that the stream holds exactly `expected` messages of the job.
 */
async function readFromStream(jobId: string, expected: number): Promise<Received[]> {
  const nc = await connect({ servers: nats.url });
  try {
    const jsm = await jetstreamManager(nc);
    const durable = `test-${jobId.replace(/[^A-Za-z0-9]/g, '')}-${Date.now()}`;
    await jsm.consumers.add(STREAM, {
      durable_name: durable,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      filter_subject: `dppa.jobs.${jobId}.>`,
    });
    const consumer = await jetstream(nc).consumers.get(STREAM, durable);
    const messages = await consumer.consume({ max_messages: 16 });
    const got: Received[] = [];
    const timer = setTimeout(() => void messages.close(), 15_000);
    for await (const m of messages) {
      got.push({ subject: m.subject, msgId: m.headers?.get('Nats-Msg-Id'), payload: m.string() });
      await m.ackAck();
      if (/\.(merged|failed)$/.test(m.subject)) break;
    }
    clearTimeout(timer);
    await messages.close();
    assert.equal((await consumer.info()).num_pending, 0, 'nothing follows the final event');
    const info = await jsm.streams.info(STREAM, { subjects_filter: `dppa.jobs.${jobId}.>` });
    const stored = Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
    assert.equal(stored, expected, 'the stream holds each event of the job once');
    await jsm.consumers.delete(STREAM, durable);
    return got;
  } finally {
    await nc.drain();
  }
}

/** Asserts that the stream delivered exactly the events WatchJob streamed, in order, on the documented subjects. */
function assertSame(jobId: string, got: Received[], events: JobEvent[]): void {
  assert.deepEqual(
    got.map((g) => g.subject),
    events.map((e) => `dppa.jobs.${jobId}.${kindOf(e)}`),
  );
  assert.deepEqual(
    got.map((g) => g.msgId),
    events.map((e) => `${jobId}-${e.seq}`),
  );
  for (const [i, g] of got.entries()) {
    const payload = JSON.parse(g.payload) as Record<string, unknown>;
    assert.deepEqual(payload, JobEvent.toJSON(events[i]!), `payload of event ${i + 1}`);
    assert.deepEqual(JobEvent.fromJSON(payload), events[i]);
  }
}

describe('job events on NATS JetStream', () => {
  it('publishes every event of a job on dppa.jobs.<job>.<kind>, in order, payloads as WatchJob streams them', async () => {
    const { jobId, tokens } = await createJob();
    const watched = watchAll(h.jobs, ADMIN, jobId);
    await Promise.all(
      ['math', 'law'].map((p) => upload(h.uploads, tokens[p]!, uploadMessages(jobId, p, deltas.get(p)!))),
    );
    const events = await watched;
    assert.ok(events.at(-1)?.merged !== undefined);

    const got = await readFromStream(jobId, events.length);
    assertSame(jobId, got, events);
    const kinds = new Set(got.map((g) => g.subject.split('.').at(-1)!));
    for (const k of ['party_joined', 'upload_progress', 'upload_complete', 'state_changed', 'merge_progress', 'merged'])
      assert.ok(kinds.has(k), k);
    for (const k of kinds) assert.ok(KINDS.includes(k), `${k} is a documented kind`);
    // A payload, as docs/events.md shows it: proto3 JSON, uint64 as a string, enums by name.
    const changed = JSON.parse(got.find((g) => g.subject.endsWith('.state_changed'))!.payload) as {
      seq: unknown;
      stateChanged: { to: unknown };
    };
    assert.equal(typeof changed.seq, 'string');
    assert.match(String(changed.stateChanged.to), /^JOB_STATE_/);

    await until('the outbox is empty', async () => (await metric('dppa_nats_outbox_pending')) === 0);
    assert.ok((await metric('dppa_nats_published_total')) >= events.length);

    // The subscriber of docs/examples follows the same job to its end.
    const example = await run([
      new URL('../docs/examples/nats-wait-merged.ts', import.meta.url).pathname,
      nats.url,
      jobId,
    ]);
    assert.equal(example.code, 0, example.stderr);
    assert.match(example.stdout, new RegExp(`^${events.length} \\S+ merged$`, 'm'));
    assert.match(example.stdout, /^merged in [0-9.]+ s: .*model\.safetensors/m);
  });

  it('NATS stopped mid-job: uploads and the merge go on, and every event arrives once, in order, when NATS returns', async () => {
    const { jobId, tokens } = await createJob();
    const watched = watchAll(h.jobs, ADMIN, jobId);
    await upload(h.uploads, tokens.math!, uploadMessages(jobId, 'math', deltas.get('math')!));
    const [first, rest] = split('law', 2);
    await upload(h.uploads, tokens.law!, uploadMessages(jobId, 'law', first));
    await until('the first events are published', async () => (await metric('dppa_nats_outbox_pending')) === 0);

    await nats.stop();
    // No RPC waits for NATS: the rest of the upload completes and the job merges while NATS is away.
    assert.equal((await upload(h.uploads, tokens.law!, uploadMessages(jobId, 'law', rest))).complete, true);
    const events = await watched;
    assert.ok(events.at(-1)?.merged !== undefined, 'the job merged without NATS');
    await until('the events wait in the outbox', async () => (await metric('dppa_nats_outbox_pending')) > 0);

    await nats.start();
    await until('the outbox is empty again', async () => (await metric('dppa_nats_outbox_pending')) === 0);
    assertSame(jobId, await readFromStream(jobId, events.length), events);
  });

  it('a server stopped while NATS is away publishes what it missed after its restart, and nothing twice', async () => {
    const { jobId, tokens } = await createJob();
    await nats.stop();
    await upload(h.uploads, tokens.math!, uploadMessages(jobId, 'math', deltas.get('math')!));
    await until('the events wait in the outbox', async () => (await metric('dppa_nats_outbox_pending')) > 0);
    await h.close();

    await nats.start();
    h = await startNatsHarness();
    const watched = watchAll(h.jobs, ADMIN, jobId);
    await upload(h.uploads, tokens.law!, uploadMessages(jobId, 'law', deltas.get('law')!));
    const events = await watched;
    assert.ok(events.at(-1)?.merged !== undefined);
    assertSame(jobId, await readFromStream(jobId, events.length), events);
    await until('the outbox is empty', async () => (await metric('dppa_nats_outbox_pending')) === 0);

    // As if the server had crashed after JetStream acknowledged the events but before it saved how far it got:
    // at the next start it asks the stream and publishes nothing again.
    await h.close();
    const cursorFile = join(data, 'jobs', jobId, 'nats-published.json');
    assert.equal(
      (JSON.parse(await readFile(cursorFile, 'utf8')) as { publishedSeq: string }).publishedSeq,
      String(events.length),
    );
    await writeFile(cursorFile, JSON.stringify({ version: 1, publishedSeq: '3' }));
    h = await startNatsHarness();
    await until('the outbox is empty', async () => (await metric('dppa_nats_outbox_pending')) === 0);
    assert.equal(await metric('dppa_nats_published_total'), 0, 'nothing was published again');
    assert.equal(await metric('dppa_nats_publish_errors_total'), 0);
    assertSame(jobId, await readFromStream(jobId, events.length), events);
  });

  it('creates the stream with the documented limits, or updates them keeping what an operator set', async () => {
    const days30 = 30 * 24 * 3600 * 1e9;
    const expectLimits = (c: {
      max_age: number;
      max_bytes: number;
      duplicate_window?: number;
      discard?: string;
    }): void => {
      assert.deepEqual(
        [c.max_age, c.max_bytes, c.duplicate_window, c.discard],
        [days30, 1024 ** 3, 10 * 60 * 1e9, 'old'],
      );
    };
    const nc = await connect({ servers: nats.url });
    try {
      const created = (await (await jetstreamManager(nc)).streams.info(STREAM)).config;
      assert.deepEqual(created.subjects, ['dppa.jobs.>']);
      assert.equal(created.storage, 'file');
      expectLimits(created);
    } finally {
      await nc.drain();
    }

    const other = await startNatsServer();
    const onc = await connect({ servers: other.url });
    try {
      const jsm = await jetstreamManager(onc);
      await jsm.streams.add({
        name: STREAM,
        subjects: ['ops.>'],
        description: 'kept',
        max_age: 3600e9,
        storage: StorageType.Memory,
      });
      const server = new DppaServer({
        adminToken: ADMIN,
        dataDir: join(dir, 'other'),
        grpcPort: 0,
        metricsPort: 0,
        nats: { url: other.url },
        logger: createLogger({ level: 'silent' }),
      });
      await server.start();
      await server.stop();
      const updated = (await jsm.streams.info(STREAM)).config;
      assert.deepEqual(updated.subjects, ['ops.>', 'dppa.jobs.>']);
      assert.equal(updated.description, 'kept');
      assert.equal(updated.storage, 'memory');
      expectLimits(updated);
    } finally {
      await onc.drain();
      await other.close();
    }
  });

  it('refuses to start when NATS is unreachable, naming the URL', async () => {
    const url = `nats://127.0.0.1:${await freePort()}`;
    const server = new DppaServer({
      adminToken: ADMIN,
      dataDir: join(dir, 'unreachable'),
      grpcPort: 0,
      metricsPort: 0,
      nats: { url },
      logger: createLogger({ level: 'silent' }),
    });
    await assert.rejects(server.start(), (err: Error) => {
      assert.equal(err.name, 'NatsUnavailableError');
      assert.match(err.message, new RegExp(`^cannot connect to NATS at ${url}: connection refused`));
      return true;
    });

    // The same from the command line: a clear message and a non-zero exit code.
    const launcher = new URL('./fixtures/serve-cli.ts', import.meta.url).pathname;
    const cli = await run(
      [launcher, 'serve', '--data', join(dir, 'unreachable'), '--grpc-port', '0', '--metrics-port', '0', '--nats', url],
      { DPPA_ADMIN_TOKEN: ADMIN, DPPA_NATS_URL: '' },
    );
    assert.equal(cli.code, 1);
    assert.ok(cli.stderr.includes(`dppa serve: cannot start: cannot connect to NATS at ${url}`), cli.stderr);
    assert.equal(cli.stdout, '', 'no listener was announced');
  });

  it('refuses a NATS server without JetStream, and a credentials file it cannot read', async () => {
    const plain = await startNatsServer({ jetstream: false });
    try {
      const server = new DppaServer({
        adminToken: ADMIN,
        dataDir: join(dir, 'nojs'),
        grpcPort: 0,
        metricsPort: 0,
        nats: { url: plain.url },
        logger: createLogger({ level: 'silent' }),
      });
      await assert.rejects(
        server.start(),
        new RegExp(
          `NATS at ${plain.url} cannot hold the job events in stream DPPA_EVENTS \\(JetStream must be enabled`,
        ),
      );
    } finally {
      await plain.close();
    }
    const server = new DppaServer({
      adminToken: ADMIN,
      dataDir: join(dir, 'nocreds'),
      grpcPort: 0,
      metricsPort: 0,
      nats: { url: nats.url, credsFile: join(dir, 'none.creds') },
      logger: createLogger({ level: 'silent' }),
    });
    await assert.rejects(server.start(), /^ConfigError: nats\.credsFile: cannot read .*none\.creds/);
  });

  it('takes --nats, DPPA_NATS_URL and --nats-creds, and checks the URL', async () => {
    const env = { DPPA_ADMIN_TOKEN: ADMIN };
    assert.equal((await optionsFromFlags({}, env)).nats, undefined, 'no NATS unless asked');
    assert.deepEqual((await optionsFromFlags({ nats: 'nats://a:4222', natsCreds: 'u.creds' }, env)).nats, {
      url: 'nats://a:4222',
      credsFile: 'u.creds',
    });
    assert.deepEqual((await optionsFromFlags({}, { ...env, DPPA_NATS_URL: 'b:4222' })).nats, { url: 'b:4222' });
    assert.deepEqual(
      (await optionsFromFlags({ nats: 'c:4222' }, { ...env, DPPA_NATS_URL: 'b:4222' })).nats,
      { url: 'c:4222' },
      'the flag wins',
    );
    await assert.rejects(optionsFromFlags({ natsCreds: 'u.creds' }, env), /--nats-creds needs --nats URL/);
    for (const url of ['', 'http://a:4222', 'nats://']) {
      assert.throws(
        () => withDefaults({ adminToken: ADMIN, nats: { url } }),
        (err: Error) => err instanceof ConfigError && err.message.startsWith('nats.url: '),
        url,
      );
    }
    assert.equal(
      withDefaults({ adminToken: ADMIN, nats: { url: 'nats://a:4222, tls://b:4443' } }).nats?.url,
      'nats://a:4222, tls://b:4443',
    );
  });
});
