/**
 * `npm run bench:server`: the aggregation server end to end on a ~1.1B-parameter
 * model. Three parties upload a delta of a generated LLaMA checkpoint with
 * TinyLlama-1.1B's shapes (22 layers, hidden 2048, intermediate 5632, vocab
 * 32000, 4 key/value heads: k/v 256×2048; bf16, sharded at ~1 GB), pruned by DP
 * at rate 0.9 (outside tensors dense, the default), over loopback; the server
 * merges them with DPA off.
 *
 * Everything runs as whole processes from dist/ (`dppa serve`, `dppa prune`,
 * `dppa push`, `dppa job …`), each under a small python3 wrapper that reads
 * its peak RSS and CPU time. In the same run it measures the references the
 * goals are set against: a raw TCP loopback copy of the same bytes (three
 * node sender processes streaming the three .dppa files to one receiver
 * process, concurrently) and `cp -r` of the base checkpoint folder. Beside
 * them, the floors of Node itself on this machine: the same bytes through a
 * bare grpc-js call, and a Node copy of the base through memory with fsync
 * (the I/O any merge in Node does, without the merge: `cp` copies inside the
 * kernel).
 *
 * Goals (printed, never enforced): upload ≥ 50% of raw loopback throughput,
 * merge ≤ 2× the `cp -r`, server peak RSS < 1 GiB.
 *
 * Inputs go to .bench/server/tinyllama-<layers>l/ (about 2.2 GB per checkpoint,
 * 4 checkpoints) and are reused by later runs; run outputs (deltas, the
 * server's data folder, copies) go to .bench/server/run/ and are deleted at the
 * end.
 *
 *   npm run bench:server [-- --runs 3 --clean --keep --reuse-deltas --cpu-prof --layers 22]
 *
 *   --runs N     repetitions of the raw TCP copy and of the cp (median; default 3)
 *   --clean      also delete the generated checkpoints at the end
 *   --keep       keep the run outputs (deltas, server data with the merged checkpoint)
 *   --reuse-deltas  upload the deltas a --keep run left instead of pruning again (for trying server changes)
 *   --cpu-prof   run the server with --cpu-prof (profiles in .bench/server/prof/) and print its hottest functions
 *   --layers N   fewer layers for a quick try (default 22: TinyLlama)
 *   --upload-only  stop after the upload (a fourth party that never uploads keeps the merge from starting; no
 *                patch job, no copies): the upload's figures, profile and JSON line only
 *   --server-node-flags "F …"  flags for the node process of `dppa serve` (e.g. "--single-threaded-gc")
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { measureProcess, median, nodeCopySeconds, printTopSelfTime, type CpuProfile } from './measure.js';
import {
  dppa,
  lines,
  load,
  root,
  sampleRss,
  scrape,
  spawnMeasured,
  startServer,
  threadCpu,
  vmHwmMiB,
  type Measured,
} from './processes.js';
import { folderBytes, generateTinyLlama, tinyLlama } from './tinyllama-inputs.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    layers: { type: 'string', default: '22' },
    clean: { type: 'boolean' },
    keep: { type: 'boolean' },
    'reuse-deltas': { type: 'boolean' },
    'cpu-prof': { type: 'boolean' },
    'upload-only': { type: 'boolean' },
    'server-node-flags': { type: 'string', default: '' },
  },
});
const runs = Number(values.runs);
const LAYERS = Number(values.layers);
if (!Number.isInteger(runs) || runs < 1) throw new RangeError(`--runs: expected an integer ≥ 1, got ${values.runs}`);
if (!Number.isInteger(LAYERS) || LAYERS < 1)
  throw new RangeError(`--layers: expected an integer ≥ 1, got ${values.layers}`);

const benchDir = join(root, '.bench', 'server');
const runDir = join(benchDir, 'run');
const profDir = join(benchDir, 'prof');
const PARTIES = ['math', 'law', 'finance'] as const;
const RATE = '0.9';
const benchStart = performance.now();

// ---------------------------------------------------------------------------
// The model: TinyLlama-1.1B shapes, generated with a cheap PRNG (tinyllama-inputs.ts).

const model = tinyLlama(LAYERS);
const { shape: SHAPE, kvDim: KV, params: PARAMS } = model;
const generate = (): Promise<number | undefined> => generateTinyLlama(model);

// ---------------------------------------------------------------------------
// The references for the upload: the same bytes over raw TCP loopback, and as
// the messages of a bare grpc-js client-streaming call whose server discards
// them (grpc-js's own cost). One receiver process, one sender process per file.

const RAW_RECEIVER = `
const net = require('node:net');
const want = Number(process.argv[1]);
let got = 0, ended = 0;
const srv = net.createServer((s) => {
  s.on('data', (b) => { got += b.length; });
  s.on('end', () => { if (++ended === want) { process.stdout.write('done ' + got + '\\n'); srv.close(); } });
});
srv.listen(0, '127.0.0.1', () => process.stdout.write('port ' + srv.address().port + '\\n'));`;

const RAW_SENDER = `
const fs = require('node:fs'), net = require('node:net');
const s = net.connect(Number(process.argv[1]), '127.0.0.1', () => fs.createReadStream(process.argv[2], { highWaterMark: 1 << 20 }).pipe(s));`;

/** A generic bytes-in, bytes-out client-streaming method, as the upload is. */
const GRPC_METHOD = `{ up: { path: '/bench.Sink/Up', requestStream: true, responseStream: false,
  requestSerialize: (b) => b, requestDeserialize: (b) => b, responseSerialize: (b) => b, responseDeserialize: (b) => b } }`;

const GRPC_RECEIVER = `
const grpc = require('@grpc/grpc-js');
const want = Number(process.argv[1]);
let got = 0, ended = 0;
const srv = new grpc.Server({ 'grpc.max_receive_message_length': 16 << 20 });
srv.addService(${GRPC_METHOD}, { up: (call, cb) => {
  call.on('data', (b) => { got += b.length; });
  call.on('end', () => { cb(null, Buffer.alloc(0)); if (++ended === want) { const u = process.cpuUsage(); process.stdout.write('done ' + got + ' ' + (u.user + u.system) / 1e6 + '\\n');
    // Exits by itself (once the answers are out), so that a --cpu-prof profile is written.
    setTimeout(() => process.exit(0), 500); } });
} });
srv.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, port) => {
  // The receive window dppa serve sets (server/rpc/receive-window.ts), so that the two compare like for like.
  for (const h of srv.http2Servers.keys()) h.on('session', (s) => { s.settings({ initialWindowSize: 4 << 20 }); s.setLocalWindowSize(4 << 20); });
  process.stdout.write('port ' + port + '\\n');
});`;

/** Sends the file in messages of about the size of a sparse chunk record (700 kB), with backpressure. */
const GRPC_SENDER = `
const fs = require('node:fs'), grpc = require('@grpc/grpc-js');
const Client = grpc.makeGenericClientConstructor(${GRPC_METHOD});
const c = new Client('127.0.0.1:' + process.argv[1], grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 16 << 20 });
const call = c.up((e) => { if (e) { console.error(e); process.exit(1); } process.exit(0); });
(async () => {
  for await (const b of fs.createReadStream(process.argv[2], { highWaterMark: 700000 })) {
    if (!call.write(b)) await new Promise((r) => call.once('drain', r));
  }
  call.end();
})();`;

/**
 * Seconds from the receiver's start to its report that every sender's bytes
 * arrived, and the receiver's CPU seconds then if it reports them (NaN if not).
 * The receiver is stopped only once every sender has exited (a grpc-js sender
 * waits for its call's answer).
 */
async function copyOver(
  receiverScript: string,
  senderScript: string,
  files: string[],
  bytes: number,
  what: string,
): Promise<{ seconds: number; receiverCpu: number }> {
  // With --cpu-prof, the bare grpc-js receiver is profiled too (.bench/server/prof-bare/), to compare with the server.
  const prof =
    values['cpu-prof'] === true && receiverScript === GRPC_RECEIVER
      ? ['--cpu-prof', `--cpu-prof-dir=${profDir}-bare`]
      : [];
  const receiver = spawn(process.execPath, [...prof, '-e', receiverScript, String(files.length)], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const senders: Promise<void>[] = [];
  let t0 = 0;
  try {
    return await new Promise<{ seconds: number; receiverCpu: number }>((resolve, reject) => {
      receiver.on('error', reject);
      receiver.on('exit', (code) => code !== 0 && reject(new Error(`${what} receiver exited with ${code}`)));
      lines(receiver.stdout, (line) => {
        const [kind, value, cpu] = line.split(' ');
        if (kind === 'port') {
          t0 = performance.now();
          for (const f of files) {
            const sender = spawn(process.execPath, ['-e', senderScript, value!, f], { cwd: root, stdio: 'inherit' });
            senders.push(
              new Promise<void>((done) => {
                sender.on('error', reject).on('exit', (code) => {
                  if (code !== 0) reject(new Error(`${what} sender of ${f} exited with ${code}`));
                  done();
                });
              }),
            );
          }
        } else if (kind === 'done') {
          const dt = (performance.now() - t0) / 1000;
          if (Number(value) !== bytes) reject(new Error(`${what} received ${value} bytes of ${bytes}`));
          resolve({ seconds: dt, receiverCpu: cpu === undefined ? Number.NaN : Number(cpu) });
        }
      });
    });
  } finally {
    await Promise.all(senders);
    // A profiled receiver exits by itself (killed, it would write no profile).
    if (prof.length > 0 && receiver.exitCode === null) await new Promise((resolve) => receiver.once('exit', resolve));
    if (receiver.exitCode === null) receiver.kill();
  }
}

// ---------------------------------------------------------------------------
// The patch-only job: a second job of the same base, `--output patch`, the
// same deltas pushed again; timed like the dense merge (last upload complete →
// merged event).

async function patchOnlyJob(
  address: string,
  env: NodeJS.ProcessEnv,
  serverPid: number,
): Promise<{ jobId: string; seconds: number; mergeRssMiB: number }> {
  const created = JSON.parse(
    dppa(
      [
        'job',
        'create',
        '--server',
        address,
        '--base',
        join(model.dir, 'base'),
        '--parties',
        PARTIES.join(','),
        '--rate',
        RATE,
        '--method',
        'dp',
        '--dpa',
        'off',
        '--output',
        'patch',
        '--label',
        'bench:server patch',
        '--json',
      ],
      env,
    ),
  ) as {
    jobId: string;
    tokens: Record<string, string>;
  };
  const watch = spawn(
    process.execPath,
    ['bin/dppa.js', 'job', 'watch', '--server', address, '--job', created.jobId, '--json'],
    { cwd: root, env, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const times = new Map<string, number>();
  const ended = new Promise<string>((resolve) => {
    lines(watch.stdout, (line) => {
      const ev = JSON.parse(line) as { type: string; time: string; reason?: string };
      if (ev.type === 'uploadComplete' || ev.type === 'merged')
        times.set(ev.type, Math.max(times.get(ev.type) ?? 0, Date.parse(ev.time)));
      if (ev.type === 'merged' || ev.type === 'failed')
        resolve(ev.type === 'merged' ? 'merged' : `failed: ${ev.reason}`);
    });
  });
  try {
    const pushed = await Promise.all(
      PARTIES.map(
        (p, i) =>
          spawnMeasured(
            process.execPath,
            [
              'bin/dppa.js',
              'push',
              '--server',
              address,
              '--job',
              created.jobId,
              '--party',
              p,
              '--delta',
              deltas[i]!,
              '--json',
            ],
            { ...process.env, DPPA_TOKEN: created.tokens[p] },
          ).done,
      ),
    );
    for (const [i, m] of pushed.entries())
      if (m.code !== 0) throw new Error(`push ${PARTIES[i]} (patch job) failed (${m.code}):\n${m.stderr}`);
    // The server's resident set while it merges (from the pushes' end, so the upload's own peak is left out).
    const rss = sampleRss(serverPid);
    const end = await ended;
    const mergeRssMiB = rss.stop();
    if (end !== 'merged') throw new Error(`the patch-only job ${end}`);
    return {
      jobId: created.jobId,
      seconds: (times.get('merged')! - times.get('uploadComplete')!) / 1000,
      mergeRssMiB,
    };
  } finally {
    watch.kill('SIGTERM');
  }
}

// ---------------------------------------------------------------------------
// The CPU profile summary (self time per function, over every profile written).

async function summarizeProfiles(dir: string): Promise<void> {
  for (const f of (await readdir(dir).catch(() => [])).filter((n) => n.endsWith('.cpuprofile')).sort()) {
    printTopSelfTime(f, JSON.parse(await readFile(join(dir, f), 'utf8')) as CpuProfile, `file://${root}`);
  }
}

// ---------------------------------------------------------------------------
// The run.

const loadAtStart = load();
console.log(`load average at start: ${loadAtStart} (2 cores: above 2 means other work competes)`);
const generated = await generate();
const { dir: inputs } = model;
const base = join(inputs, 'base');
const baseBytes = await folderBytes(base);
console.log(generated === undefined ? `reusing ${inputs}` : `generated in ${generated.toFixed(1)} s`);

console.log('building dist/ …');
execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });

const deltas = PARTIES.map((p) => join(runDir, `${p}.dppa`));
const reuse = values['reuse-deltas'] === true;
if (reuse) {
  for (const f of deltas)
    if (!statSync(f, { throwIfNoEntry: false })?.isFile())
      throw new Error(`--reuse-deltas: ${f} is missing (run once with --keep)`);
  await rm(join(runDir, 'data'), { recursive: true, force: true });
} else {
  await rm(runDir, { recursive: true, force: true });
  await mkdir(runDir, { recursive: true });
}
const adminToken = randomBytes(24).toString('base64url');
const adminEnv = { ...process.env, DPPA_ADMIN_TOKEN: adminToken };
let server: { child: ChildProcess; done: Promise<Measured> } | undefined;
/** Thrown to end an `--upload-only` run early (through the cleanup below). */
const UPLOAD_ONLY_DONE = new Error('upload only: done');
let watcher: ChildProcess | undefined;
try {
  // 1. Prune the three fine-tunes (not part of the upload timing).
  const prunes: { seconds: number; maxRssMiB: number }[] = [];
  for (const [i, p] of PARTIES.entries()) {
    if (reuse) break;
    const r = measureProcess(
      process.execPath,
      [
        'bin/dppa.js',
        'prune',
        '--base',
        base,
        '--finetuned',
        join(inputs, `ft${i + 1}`),
        '--rate',
        RATE,
        '--method',
        'dp',
        '--out',
        deltas[i]!,
        '--workers',
        '2',
      ],
      { cwd: root },
    );
    prunes.push(r);
    console.log(
      `prune ${p.padEnd(7)} ${r.seconds.toFixed(1)} s, peak RSS ${r.maxRssMiB.toFixed(0)} MiB, ${(statSync(deltas[i]!).size / 1e6).toFixed(0)} MB`,
    );
  }
  const deltaBytes = deltas.reduce((a, f) => a + statSync(f).size, 0);

  // 2. Raw TCP loopback copy of the same bytes, and the same bytes through a bare grpc-js call.
  const raws: number[] = [];
  const grpcs: number[] = [];
  const grpcCpus: number[] = [];
  if (values['cpu-prof'] === true) await rm(`${profDir}-bare`, { recursive: true, force: true });
  for (let i = 0; i < runs; i++) {
    raws.push((await copyOver(RAW_RECEIVER, RAW_SENDER, deltas, deltaBytes, 'raw TCP')).seconds);
    console.log(
      `raw TCP copy ${i + 1}/${runs}: ${raws.at(-1)!.toFixed(2)} s (${(deltaBytes / 1e6 / raws.at(-1)!).toFixed(0)} MB/s)`,
    );
    const g = await copyOver(GRPC_RECEIVER, GRPC_SENDER, deltas, deltaBytes, 'bare grpc-js');
    grpcs.push(g.seconds);
    grpcCpus.push(g.receiverCpu);
    console.log(
      `bare grpc-js copy ${i + 1}/${runs}: ${g.seconds.toFixed(2)} s (${(deltaBytes / 1e6 / g.seconds).toFixed(0)} MB/s), receiver CPU ${g.receiverCpu.toFixed(1)} s`,
    );
  }

  // 3. The server, with its whole life measured.
  const dataDir = join(runDir, 'data');
  const nodeFlags = [
    ...(values['cpu-prof'] === true ? ['--cpu-prof', `--cpu-prof-dir=${profDir}`] : []),
    ...values['server-node-flags'].split(' ').filter((f) => f !== ''),
  ];
  if (values['cpu-prof'] === true) await rm(profDir, { recursive: true, force: true });
  const served = await startServer(dataDir, adminEnv, nodeFlags);
  server = served.server;
  const { grpcPort, metricsPort, pid: serverPid } = served;
  const address = `127.0.0.1:${grpcPort}`;

  // 4. The job, and a watcher of its events.
  const created = JSON.parse(
    dppa(
      [
        'job',
        'create',
        '--server',
        address,
        '--base',
        base,
        '--parties',
        // --upload-only: a fourth party that never uploads keeps the merge from starting, so that its CPU does not
        // count in the upload's.
        [...PARTIES, ...(values['upload-only'] === true ? ['idle'] : [])].join(','),
        '--rate',
        RATE,
        '--method',
        'dp',
        '--dpa',
        'off',
        '--output',
        'dense',
        '--label',
        'bench:server',
        '--json',
      ],
      adminEnv,
    ),
  ) as {
    jobId: string;
    tokens: Record<string, string>;
  };
  const { jobId } = created;
  const events: {
    type: string;
    time: string;
    party?: string;
    seconds?: number;
    reason?: string;
    tensorsDone?: number;
    tensorsTotal?: number;
  }[] = [];
  watcher = spawn(process.execPath, ['bin/dppa.js', 'job', 'watch', '--server', address, '--job', jobId, '--json'], {
    cwd: root,
    env: adminEnv,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const finished = new Promise<{ type: string; at: number }>((resolve) => {
    lines(watcher!.stdout!, (line) => {
      const ev = JSON.parse(line) as (typeof events)[number];
      events.push(ev);
      if (ev.type === 'merged' || ev.type === 'failed') resolve({ type: ev.type, at: performance.now() });
    });
  });
  const before = await scrape(metricsPort);
  const threadsBefore = threadCpu(serverPid);
  const loadBeforeUpload = load();

  // 5. Three concurrent pushes.
  const t0 = performance.now();
  const pushes = PARTIES.map((p, i) => {
    const run = spawnMeasured(
      process.execPath,
      ['bin/dppa.js', 'push', '--server', address, '--job', jobId, '--party', p, '--delta', deltas[i]!, '--json'],
      { ...process.env, DPPA_TOKEN: created.tokens[p] },
    );
    return run.done.then((m) => ({ ...m, at: performance.now() }));
  });
  const pushed = await Promise.all(pushes);
  for (const [i, m] of pushed.entries())
    if (m.code !== 0) throw new Error(`push ${PARTIES[i]} failed (${m.code}):\n${m.stderr}`);
  const uploadSeconds = (Math.max(...pushed.map((m) => m.at)) - t0) / 1000;
  const afterUpload = await scrape(metricsPort);
  const hwmAfterUpload = vmHwmMiB(serverPid);
  if (values['upload-only'] === true) {
    const threadsAfter = threadCpu(serverPid);
    server.child.kill('SIGTERM');
    await server.done;
    server = undefined;
    const cpuOf = (m: Map<string, number>): number => m.get('process_cpu_seconds_total') ?? Number.NaN;
    const serverCpu = cpuOf(afterUpload) - cpuOf(before);
    const bare = median(grpcs);
    const bareCpu = median(grpcCpus);
    console.log(
      `\nupload only: ${uploadSeconds.toFixed(2)} s, bare grpc-js ${bare.toFixed(2)} s (${(uploadSeconds / bare).toFixed(2)}×, goal ≤ 1.25×); server CPU ${serverCpu.toFixed(2)} s, bare receiver ${bareCpu.toFixed(2)} s (${(serverCpu / bareCpu).toFixed(2)}×, goal ≤ 1.5×); server peak RSS ${hwmAfterUpload.toFixed(0)} MiB`,
    );
    console.log(
      `push processes: ${pushed.map((m, i) => `${PARTIES[i]} ${m.seconds.toFixed(2)} s, CPU ${m.cpuSeconds.toFixed(1)} s`).join('; ')}`,
    );
    console.log(
      `server CPU by thread during the upload: main thread ${(threadsAfter.main - threadsBefore.main).toFixed(2)} s, other threads (thread pool: file writes, fsyncs; GC helpers) ${(threadsAfter.others - threadsBefore.others).toFixed(2)} s`,
    );
    console.log(
      `load average (1, 5, 15 min): start ${loadAtStart}; before the upload ${loadBeforeUpload}; end ${load()}`,
    );
    if (values['cpu-prof'] === true) {
      await summarizeProfiles(`${profDir}-bare`);
      await summarizeProfiles(profDir);
    }
    console.log(
      JSON.stringify({
        layers: LAYERS,
        upload_s: uploadSeconds,
        bare_grpc_s: bare,
        raw_tcp_s: median(raws),
        server_upload_cpu_s: serverCpu,
        bare_grpc_cpu_s: bareCpu,
        uploaded_bytes: deltaBytes,
      }),
    );
    throw UPLOAD_ONLY_DONE;
  }

  // 6. The merge.
  const end = await finished;
  const afterMerge = await scrape(metricsPort);
  const hwmAfterMerge = vmHwmMiB(serverPid);
  const loadAfterMerge = load();
  if (end.type !== 'merged') throw new Error(`the job failed: ${events.at(-1)?.reason}`);
  const time = (type: string, pick: 'first' | 'last'): number => {
    const ts = events.filter((e) => e.type === type).map((e) => Date.parse(e.time));
    return pick === 'first' ? Math.min(...ts) : Math.max(...ts);
  };
  const serverUploadSeconds = (time('uploadComplete', 'last') - time('partyJoined', 'first')) / 1000;
  const mergeSeconds = (time('merged', 'last') - time('uploadComplete', 'last')) / 1000;
  const mergeCore = events.find((e) => e.type === 'merged')!.seconds!;
  // The merge_progress event of the last tensor: after it come the fsyncs, the rename and the SHA-256 of the output.
  const lastTensor = events.find((e) => e.type === 'mergeProgress' && e.tensorsDone === e.tensorsTotal);
  const mergeTail =
    lastTensor === undefined ? Number.NaN : (time('merged', 'last') - Date.parse(lastTensor.time)) / 1000;
  const status = JSON.parse(dppa(['job', 'status', '--server', address, '--job', jobId, '--json'], adminEnv)) as {
    state: string;
  };
  const mergedBytes = await folderBytes(join(dataDir, 'jobs', jobId, 'merged'));
  if (status.state !== 'merged' || mergedBytes < baseBytes * 0.99)
    throw new Error(`job ${jobId} is ${status.state}, merged folder ${mergedBytes} bytes`);

  // 6b. The same three deltas again into a patch-only job: the merged patch's time and size.
  const patchJob = await patchOnlyJob(address, adminEnv, serverPid);
  const patchBytes = statSync(join(dataDir, 'jobs', patchJob.jobId, 'merged-patch.dppa')).size;
  const hwmAfterPatch = vmHwmMiB(serverPid);

  // 7. Stop the server: its peak RSS over its whole life.
  server.child.kill('SIGTERM');
  const serverRun = await server.done;
  server = undefined;
  await writeFile(join(runDir, 'server.log'), served.log());

  // 8. cp -r of the base checkpoint (then its fsync, which the merge also does), and the Node copy; same disk.
  const cps: number[] = [];
  const syncs: number[] = [];
  const nodeCopies: number[] = [];
  for (let i = 0; i < runs; i++) {
    const copy = join(runDir, 'cp-copy');
    cps.push(measureProcess('cp', ['-r', base, copy]).seconds);
    const files = (await readdir(copy)).map((f) => join(copy, f));
    syncs.push(measureProcess('sync', files).seconds);
    await rm(copy, { recursive: true, force: true });
    nodeCopies.push(nodeCopySeconds(base, copy));
    await rm(copy, { recursive: true, force: true });
    console.log(
      `cp -r ${i + 1}/${runs}: ${cps.at(-1)!.toFixed(2)} s, then sync of the copy ${syncs.at(-1)!.toFixed(2)} s; Node copy with fsync ${nodeCopies.at(-1)!.toFixed(2)} s`,
    );
  }

  // The figures.
  const raw = median(raws);
  const bare = median(grpcs);
  const cp = median(cps);
  const cpSync = median(cps.map((c, i) => c + syncs[i]!));
  const nodeCopy = median(nodeCopies);
  const uploadRatio = raw / uploadSeconds;
  const mergeRatio = mergeSeconds / cp;
  const cpu = (m: Map<string, number>): number => m.get('process_cpu_seconds_total') ?? Number.NaN;
  const mb = (b: number, s: number): string => (b / 1e6 / s).toFixed(0);
  const yes = (ok: boolean): string => (ok ? 'met' : 'NOT met');
  const total = (performance.now() - benchStart) / 1000;

  console.log(
    `\nServer benchmark: TinyLlama-1.1B shapes (${SHAPE.layers} layers, hidden ${SHAPE.hidden}, intermediate ${SHAPE.intermediate}, vocab ${SHAPE.vocab}, k/v ${KV}×${SHAPE.hidden}),`,
  );
  console.log(
    `${(PARAMS / 1e9).toFixed(3)}B parameters, bf16, base ${(baseBytes / 1e9).toFixed(2)} GB in ${(await readdir(base)).filter((f) => f.endsWith('.safetensors')).length} shards;`,
  );
  console.log(
    `3 parties, DP at rate ${RATE} (outside tensors dense), DPA off; .dppa files ${deltas.map((f) => (statSync(f).size / 1e6).toFixed(0)).join(' + ')} = ${(deltaBytes / 1e6).toFixed(0)} MB`,
  );
  console.log(
    reuse
      ? 'prune: deltas of an earlier run reused\n'
      : `prune (before the upload, 2 workers each): ${prunes.map((p) => p.seconds.toFixed(1)).join(', ')} s; peak RSS ${Math.max(...prunes.map((p) => p.maxRssMiB)).toFixed(0)} MiB\n`,
  );
  const rows: string[][] = [
    ['measure', 'seconds', 'MB/s', 'reference', 'ref seconds', 'ref MB/s', 'ratio', 'goal', 'status'],
    [
      'upload, 3 concurrent `dppa push`',
      uploadSeconds.toFixed(2),
      mb(deltaBytes, uploadSeconds),
      'raw TCP loopback copy',
      raw.toFixed(2),
      mb(deltaBytes, raw),
      `${(100 * uploadRatio).toFixed(1)}%`,
      '≥ 50%',
      yes(uploadRatio >= 0.5),
    ],
    [
      '',
      '',
      '',
      'bare grpc-js call, 4 MiB window, bytes discarded',
      bare.toFixed(2),
      mb(deltaBytes, bare),
      `${((100 * bare) / uploadSeconds).toFixed(1)}% (it: ${((100 * raw) / bare).toFixed(1)}% of raw)`,
      '',
      '',
    ],
    [
      'merge (last upload → merged)',
      mergeSeconds.toFixed(2),
      mb(baseBytes, mergeSeconds),
      '`cp -r` of the base',
      cp.toFixed(2),
      mb(baseBytes, cp),
      `${mergeRatio.toFixed(2)}×`,
      '≤ 2×',
      yes(mergeRatio <= 2),
    ],
    [
      '',
      '',
      '',
      '`cp -r` + sync of the copy',
      cpSync.toFixed(2),
      mb(baseBytes, cpSync),
      `${(mergeSeconds / cpSync).toFixed(2)}×`,
      '',
      '',
    ],
    [
      '',
      '',
      '',
      'Node copy through memory + fsync, no merge work',
      nodeCopy.toFixed(2),
      mb(baseBytes, nodeCopy),
      `${(mergeSeconds / nodeCopy).toFixed(2)}× (it: ${(nodeCopy / cp).toFixed(2)}× cp)`,
      '',
      '',
    ],
    [
      'server peak RSS (whole life)',
      '',
      '',
      '',
      '',
      '',
      `${serverRun.maxRssMiB.toFixed(0)} MiB`,
      '< 1024 MiB',
      yes(serverRun.maxRssMiB < 1024),
    ],
  ];
  const widths = rows[0]!.map((_, j) => Math.max(...rows.map((r) => r[j]!.length)));
  rows.splice(
    1,
    0,
    widths.map((w) => '-'.repeat(w)),
  );
  for (const r of rows) console.log(`| ${r.map((c, j) => c.padEnd(widths[j]!)).join(' | ')} |`);
  console.log('');
  console.log(
    `upload as the server saw it (first party joined → last upload complete): ${serverUploadSeconds.toFixed(2)} s (${mb(deltaBytes, serverUploadSeconds)} MB/s)`,
  );
  console.log(
    `push processes: ${pushed.map((m, i) => `${PARTIES[i]} ${m.seconds.toFixed(2)} s, peak RSS ${m.maxRssMiB.toFixed(0)} MiB, CPU ${m.cpuSeconds.toFixed(1)} s`).join('; ')}`,
  );
  console.log(
    `merge inside the server (the merge driver, incl. fsync and SHA-256 of the output): ${mergeCore.toFixed(2)} s; dppa_merge_duration_seconds_sum ${afterMerge.get('dppa_merge_duration_seconds_sum')?.toFixed(2)}`,
  );
  console.log(
    `  of which after the last tensor was written (commit with fsync, SHA-256 of every output file, job state): ${mergeTail.toFixed(2)} s`,
  );
  console.log(
    `server CPU: upload ${(cpu(afterUpload) - cpu(before)).toFixed(1)} s, merge ${(cpu(afterMerge) - cpu(afterUpload)).toFixed(1)} s, whole life ${serverRun.cpuSeconds.toFixed(1)} s (all threads; 2 cores)`,
  );
  console.log(
    `server peak RSS: ${hwmAfterUpload.toFixed(0)} MiB after the upload, ${hwmAfterMerge.toFixed(0)} MiB after the merge, ${serverRun.maxRssMiB.toFixed(0)} MiB whole life`,
  );
  console.log(
    `load average (1, 5, 15 min): start ${loadAtStart}; before the upload ${loadBeforeUpload}; after the merge ${loadAfterMerge}; end ${load()}`,
  );
  console.log(
    `merged patch (patch-only job, last upload → merged): ${patchJob.seconds.toFixed(2)} s = ${(patchJob.seconds / mergeSeconds).toFixed(2)}× the dense merge (goal ≤ 0.5×); ${(patchBytes / 1e6).toFixed(0)} MB = ${(patchBytes / mergedBytes).toFixed(3)}× the dense checkpoint's ${(mergedBytes / 1e6).toFixed(0)} MB (goal ≤ 0.45×); server peak RSS after it ${hwmAfterPatch.toFixed(0)} MiB, largest resident set during its merge ${patchJob.mergeRssMiB.toFixed(0)} MiB`,
  );
  console.log(
    `whole benchmark: ${total.toFixed(0)} s${generated === undefined ? ' (inputs reused)' : ` (generation ${generated.toFixed(0)} s)`}`,
  );
  if (values['cpu-prof'] === true) await summarizeProfiles(profDir);
  // Last line: the figures as one JSON object, for scripts.
  console.log(
    JSON.stringify({
      layers: LAYERS,
      upload_s: uploadSeconds,
      bare_grpc_s: bare,
      raw_tcp_s: raw,
      server_upload_cpu_s: cpu(afterUpload) - cpu(before),
      bare_grpc_cpu_s: median(grpcCpus),
      merge_s: mergeSeconds,
      node_io_floor_s: nodeCopy,
      cp_s: cp,
      patch_s: patchJob.seconds,
      dense_bytes: mergedBytes,
      patch_bytes: patchBytes,
      server_peak_rss_mib: serverRun.maxRssMiB,
      patch_merge_rss_mib: patchJob.mergeRssMiB,
      uploaded_bytes: deltaBytes,
    }),
  );
} catch (err) {
  if (err !== UPLOAD_ONLY_DONE) throw err;
} finally {
  watcher?.kill('SIGTERM');
  if (server !== undefined) {
    server.child.kill('SIGTERM');
    await server.done.catch(() => undefined);
  }
  if (values.keep !== true) await rm(runDir, { recursive: true, force: true });
  if (values.clean === true) await rm(inputs, { recursive: true, force: true });
}
