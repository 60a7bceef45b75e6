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
 * process, concurrently) and `cp -r` of the base checkpoint folder.
 *
 * Goals (printed, never enforced): upload ≥ 50% of raw loopback throughput,
 * merge ≤ 2× the `cp -r`, server peak RSS < 1 GiB.
 *
 * Inputs go to .bench/server/tinyllama-<layers>l/ (about 2.2 GB per checkpoint,
 * 4 checkpoints) and are reused by later runs; run outputs (deltas, the
 * server's data folder, copies) go to .bench/server/run/ and are deleted at the
 * end.
 *
 *   npm run bench:server [-- --runs 3 --clean --keep --cpu-prof --layers 22]
 *
 *   --runs N     repetitions of the raw TCP copy and of the cp (median; default 3)
 *   --clean      also delete the generated checkpoints at the end
 *   --keep       keep the run outputs (deltas, server data with the merged checkpoint)
 *   --cpu-prof   run the server with --cpu-prof (profiles in .bench/server/prof/) and print its hottest functions
 *   --layers N   fewer layers for a quick try (default 22: TinyLlama)
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync, statfsSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { CheckpointWriter, planLayout } from '../../proto/safetensors/index.js';
import { measureProcess, median } from './measure.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    layers: { type: 'string', default: '22' },
    clean: { type: 'boolean' },
    keep: { type: 'boolean' },
    'cpu-prof': { type: 'boolean' },
  },
});
const runs = Number(values.runs);
const LAYERS = Number(values.layers);
if (!Number.isInteger(runs) || runs < 1) throw new RangeError(`--runs: expected an integer ≥ 1, got ${values.runs}`);
if (!Number.isInteger(LAYERS) || LAYERS < 1) throw new RangeError(`--layers: expected an integer ≥ 1, got ${values.layers}`);

const root = new URL('../..', import.meta.url).pathname;
const benchDir = join(root, '.bench', 'server');
const inputs = join(benchDir, `tinyllama-${LAYERS}l`);
const runDir = join(benchDir, 'run');
const profDir = join(benchDir, 'prof');
const PARTIES = ['math', 'law', 'finance'] as const;
const RATE = '0.9';
const benchStart = performance.now();

// ---------------------------------------------------------------------------
// The model: TinyLlama-1.1B shapes, generated with a cheap PRNG.

const SHAPE = { layers: LAYERS, hidden: 2048, intermediate: 5632, vocab: 32000, heads: 32, kvHeads: 4 };
const KV = (SHAPE.hidden / SHAPE.heads) * SHAPE.kvHeads;

interface TensorSpec {
  name: string;
  shape: number[];
  layer: number;
}

function tinyLlamaTensors(): TensorSpec[] {
  const { hidden: h, intermediate: m, vocab: v } = SHAPE;
  const t: TensorSpec[] = [{ name: 'model.embed_tokens.weight', shape: [v, h], layer: -1 }];
  for (let l = 0; l < SHAPE.layers; l++) {
    const p = `model.layers.${l}.`;
    t.push(
      { name: `${p}self_attn.q_proj.weight`, shape: [h, h], layer: l },
      { name: `${p}self_attn.k_proj.weight`, shape: [KV, h], layer: l },
      { name: `${p}self_attn.v_proj.weight`, shape: [KV, h], layer: l },
      { name: `${p}self_attn.o_proj.weight`, shape: [h, h], layer: l },
      { name: `${p}mlp.gate_proj.weight`, shape: [m, h], layer: l },
      { name: `${p}mlp.up_proj.weight`, shape: [m, h], layer: l },
      { name: `${p}mlp.down_proj.weight`, shape: [h, m], layer: l },
      { name: `${p}input_layernorm.weight`, shape: [h], layer: l },
      { name: `${p}post_attention_layernorm.weight`, shape: [h], layer: l },
    );
  }
  t.push({ name: 'model.norm.weight', shape: [h], layer: -1 }, { name: 'lm_head.weight', shape: [v, h], layer: -1 });
  return t;
}

const TENSORS = tinyLlamaTensors();
const PARAMS = TENSORS.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
const CHECKPOINTS = ['base', 'ft1', 'ft2', 'ft3'];
const GEN_VERSION = 1;
const genMarker = join(inputs, 'generated.json');
const genSpec = JSON.stringify({ version: GEN_VERSION, shape: SHAPE, dtype: 'BF16', shardBytes: 1e9 });

/** Rounds fp32 values (as their bits) to bf16 bits, nearest even. */
function toBf16(bits: Uint32Array, m: number, out: Uint16Array, at: number): void {
  for (let i = 0; i < m; i++) {
    const u = bits[i]!;
    out[at + i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
}

/**
 * One tensor of the base and of the three fine-tunes at once, in bf16:
 * base values triangular in ±0.05 (norms 1); each fine-tune adds a
 * triangular delta of ±0.004 with outliers (×8..16) whose share varies with
 * layer, projection and party, so that DP gives the layers different rates.
 * One xorshift32 draw per base entry and two per fine-tuned entry.
 */
function generateTensor(t: TensorSpec, index: number): Uint16Array[] {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const outs = CHECKPOINTS.map(() => new Uint16Array(n));
  const CH = 1 << 16;
  const base = new Float32Array(CH);
  const baseBits = new Uint32Array(base.buffer);
  const ft = new Float32Array(CH);
  const ftBits = new Uint32Array(ft.buffer);
  let x = (0x9e3779b9 ^ Math.imul(index + 1, 0x85ebca6b)) | 0 || 1;
  const dense = t.shape.length === 1;
  const thresholds = [1, 2, 3].map((k) => {
    const share = t.layer < 0 ? 0.001 : 0.002 + 0.004 * ((t.layer * 7 + t.name.length + k) % 5);
    return Math.floor(share * 4294967296);
  });
  const outlier = 8 + (Math.max(0, t.layer) % 3) * 4;
  for (let off = 0; off < n; off += CH) {
    const m = Math.min(CH, n - off);
    if (dense) {
      base.fill(1, 0, m);
    } else {
      for (let i = 0; i < m; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        base[i] = ((x & 0xffff) + ((x >>> 16) & 0xffff) - 65535) * (0.05 / 65536);
      }
    }
    toBf16(baseBits, m, outs[0]!, off);
    for (let k = 0; k < 3; k++) {
      const thr = thresholds[k]!;
      for (let i = 0; i < m; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        const d = ((x & 0xffff) + ((x >>> 16) & 0xffff) - 65535) * (0.004 / 65536);
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        ft[i] = base[i]! + (x >>> 0 < thr ? d * outlier : d);
      }
      toBf16(ftBits, m, outs[k + 1]!, off);
    }
  }
  return outs;
}

async function generate(): Promise<number | undefined> {
  if (existsSync(genMarker) && readFileSync(genMarker, 'utf8') === genSpec) return undefined;
  const need = 4 * PARAMS * 2 * 1.05;
  const free = freeBytes(benchDir);
  if (free < need + 6e9) throw new Error(`not enough disk space in ${benchDir}: ${(free / 1e9).toFixed(1)} GB free, need about ${((need + 6e9) / 1e9).toFixed(1)} GB`);
  console.log(`generating ${inputs}: base + 3 fine-tunes, ${(PARAMS / 1e9).toFixed(2)}B parameters each, bf16 (${((4 * PARAMS * 2) / 1e9).toFixed(1)} GB) …`);
  const t0 = performance.now();
  await rm(inputs, { recursive: true, force: true });
  await mkdir(inputs, { recursive: true });
  const layout = planLayout(TENSORS.map((t) => ({ name: t.name, dtype: 'BF16' as const, shape: t.shape })), { shardBytes: 1e9 });
  const writers = await Promise.all(CHECKPOINTS.map((c) => CheckpointWriter.create(join(inputs, c), layout)));
  try {
    // Writes of one tensor overlap the generation of the next.
    let pending: Promise<void>[] = [];
    for (const [i, t] of TENSORS.entries()) {
      const data = generateTensor(t, i);
      await Promise.all(pending);
      pending = writers.map((w, k) => w.writeTensor(t.name, new Uint8Array(data[k]!.buffer)));
    }
    await Promise.all(pending);
    for (const w of writers) await w.commit();
  } finally {
    for (const w of writers) await w.abort();
  }
  const config = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: SHAPE.hidden,
    intermediate_size: SHAPE.intermediate,
    num_hidden_layers: SHAPE.layers,
    num_attention_heads: SHAPE.heads,
    num_key_value_heads: SHAPE.kvHeads,
    vocab_size: SHAPE.vocab,
    torch_dtype: 'bfloat16',
  };
  for (const c of CHECKPOINTS) {
    await writeFile(join(inputs, c, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    await writeFile(join(inputs, c, 'tokenizer.json'), '{"model": {"type": "synthetic"}}\n');
  }
  await writeFile(genMarker, genSpec);
  return (performance.now() - t0) / 1000;
}

// ---------------------------------------------------------------------------
// Processes.

function freeBytes(dir: string): number {
  let d = dir;
  while (!existsSync(d)) d = join(d, '..');
  const s = statfsSync(d);
  return s.bavail * s.bsize;
}

async function folderBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir)) n += (await stat(join(dir, f))).size;
  return n;
}

/** What the python3 wrapper reports about the process it ran. */
interface Measured {
  code: number;
  seconds: number;
  maxRssMiB: number;
  /** User + system CPU seconds of the process (all its threads). */
  cpuSeconds: number;
  /** What it wrote on stderr. */
  stderr: string;
}

/**
 * Runs a command under a python3 wrapper that forwards SIGTERM/SIGINT to it
 * and, once it exits, writes its wall time, peak RSS and CPU time to fd 3.
 */
const WRAPPER = [
  'import json, os, resource, signal, subprocess, sys, time',
  't = time.perf_counter()',
  'p = subprocess.Popen(sys.argv[1:])',
  'signal.signal(signal.SIGTERM, lambda n, f: p.send_signal(n))',
  'signal.signal(signal.SIGINT, lambda n, f: p.send_signal(n))',
  'rc = p.wait()',
  'dt = time.perf_counter() - t',
  'ru = resource.getrusage(resource.RUSAGE_CHILDREN)',
  'with os.fdopen(3, "w") as f: f.write(json.dumps({"code": rc, "seconds": dt, "maxrss_kib": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime}))',
].join('\n');

function spawnMeasured(cmd: string, args: string[], env: NodeJS.ProcessEnv): { child: ChildProcess; done: Promise<Measured> } {
  const child = spawn('python3', ['-c', WRAPPER, cmd, ...args], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
  let report = '';
  let stderr = '';
  child.stdio[3]!.on('data', (b: Buffer) => (report += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const done = new Promise<Measured>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', () => {
      if (report === '') return reject(new Error(`${cmd} ${args.join(' ')}: no report from the wrapper\n${stderr}`));
      const r = JSON.parse(report) as { code: number; seconds: number; maxrss_kib: number; cpu: number };
      resolve({ code: r.code, seconds: r.seconds, maxRssMiB: r.maxrss_kib / 1024, cpuSeconds: r.cpu, stderr });
    });
  });
  return { child, done };
}

/** The pid of the process a wrapper runs (its only child). */
function wrappedPid(wrapper: ChildProcess): number {
  const kids = readFileSync(`/proc/${wrapper.pid}/task/${wrapper.pid}/children`, 'utf8').trim();
  return Number(kids.split(/\s+/)[0]);
}

/** Peak RSS so far of a live process (VmHWM), in MiB. */
function vmHwmMiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m === null ? Number.NaN : Number(m[1]) / 1024;
}

function lines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  createInterface({ input: stream }).on('line', onLine);
}

function dppa(args: string[], env: NodeJS.ProcessEnv): string {
  return execFileSync(process.execPath, ['bin/dppa.js', ...args], { cwd: root, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
}

async function scrape(port: number): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const m = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const i = line.lastIndexOf(' ');
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

const load = (): string => loadavg().map((x) => x.toFixed(2)).join(' ');

// ---------------------------------------------------------------------------
// Raw TCP loopback: one receiver process, one sender process per file.

const RECEIVER = `
const net = require('node:net');
const want = Number(process.argv[1]);
let got = 0, ended = 0;
const srv = net.createServer((s) => {
  s.on('data', (b) => { got += b.length; });
  s.on('end', () => { if (++ended === want) { process.stdout.write('done ' + got + '\\n'); srv.close(); } });
});
srv.listen(0, '127.0.0.1', () => process.stdout.write('port ' + srv.address().port + '\\n'));`;

const SENDER = `
const fs = require('node:fs'), net = require('node:net');
const s = net.connect(Number(process.argv[1]), '127.0.0.1', () => fs.createReadStream(process.argv[2], { highWaterMark: 1 << 20 }).pipe(s));`;

async function rawCopy(files: string[], bytes: number): Promise<number> {
  const receiver = spawn(process.execPath, ['-e', RECEIVER, String(files.length)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let t0 = 0;
  try {
    return await new Promise<number>((resolve, reject) => {
      receiver.on('error', reject);
      receiver.on('exit', (code) => code !== 0 && reject(new Error(`raw TCP receiver exited with ${code}`)));
      lines(receiver.stdout, (line) => {
        const [what, value] = line.split(' ');
        if (what === 'port') {
          t0 = performance.now();
          for (const f of files) {
            spawn(process.execPath, ['-e', SENDER, value!, f], { stdio: 'inherit' })
              .on('error', reject)
              .on('exit', (code) => code !== 0 && reject(new Error(`raw TCP sender of ${f} exited with ${code}`)));
          }
        } else if (what === 'done') {
          const dt = (performance.now() - t0) / 1000;
          if (Number(value) !== bytes) reject(new Error(`raw TCP copy received ${value} bytes of ${bytes}`));
          resolve(dt);
        }
      });
    });
  } finally {
    if (receiver.exitCode === null) receiver.kill();
  }
}

// ---------------------------------------------------------------------------
// The CPU profile summary (self time per function, over every profile written).

interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number } }[];
  samples: number[];
  timeDeltas: number[];
}

async function summarizeProfiles(dir: string): Promise<void> {
  for (const f of (await readdir(dir)).filter((n) => n.endsWith('.cpuprofile')).sort()) {
    const p = JSON.parse(await readFile(join(dir, f), 'utf8')) as CpuProfile;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const self = new Map<string, number>();
    let total = 0;
    p.samples.forEach((id, i) => {
      const n = byId.get(id)!;
      const dt = p.timeDeltas[i] ?? 0;
      const url = n.callFrame.url.replace(`file://${root}`, '');
      const key = `${n.callFrame.functionName || '(anonymous)'} ${url}:${n.callFrame.lineNumber + 1}`;
      self.set(key, (self.get(key) ?? 0) + dt);
      total += dt;
    });
    const top = [...self].sort((a, b) => b[1] - a[1]).slice(0, 12);
    console.log(`\n${f}: ${(total / 1e6).toFixed(1)} s sampled; top self time:`);
    for (const [k, us] of top) console.log(`  ${((100 * us) / total).toFixed(1).padStart(5)}%  ${(us / 1e6).toFixed(2).padStart(6)} s  ${k}`);
  }
}

// ---------------------------------------------------------------------------
// The run.

const loadAtStart = load();
console.log(`load average at start: ${loadAtStart} (2 cores: above 2 means other work competes)`);
const generated = await generate();
const base = join(inputs, 'base');
const baseBytes = await folderBytes(base);
console.log(generated === undefined ? `reusing ${inputs}` : `generated in ${generated.toFixed(1)} s`);

console.log('building dist/ …');
execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });

await rm(runDir, { recursive: true, force: true });
await mkdir(runDir, { recursive: true });
const deltas = PARTIES.map((p) => join(runDir, `${p}.dppa`));
const adminToken = randomBytes(24).toString('base64url');
const adminEnv = { ...process.env, DPPA_ADMIN_TOKEN: adminToken };
let server: { child: ChildProcess; done: Promise<Measured> } | undefined;
let watcher: ChildProcess | undefined;
try {
  // 1. Prune the three fine-tunes (not part of the upload timing).
  const prunes: { seconds: number; maxRssMiB: number }[] = [];
  for (const [i, p] of PARTIES.entries()) {
    const r = measureProcess(process.execPath, ['bin/dppa.js', 'prune', '--base', base, '--finetuned', join(inputs, `ft${i + 1}`), '--rate', RATE, '--method', 'dp', '--out', deltas[i]!, '--workers', '2'], { cwd: root });
    prunes.push(r);
    console.log(`prune ${p.padEnd(7)} ${r.seconds.toFixed(1)} s, peak RSS ${r.maxRssMiB.toFixed(0)} MiB, ${(statSync(deltas[i]!).size / 1e6).toFixed(0)} MB`);
  }
  const deltaBytes = deltas.reduce((a, f) => a + statSync(f).size, 0);

  // 2. Raw TCP loopback copy of the same bytes.
  const raws: number[] = [];
  for (let i = 0; i < runs; i++) {
    raws.push(await rawCopy(deltas, deltaBytes));
    console.log(`raw TCP copy ${i + 1}/${runs}: ${raws.at(-1)!.toFixed(2)} s (${(deltaBytes / 1e6 / raws.at(-1)!).toFixed(0)} MB/s)`);
  }

  // 3. The server, with its whole life measured.
  const dataDir = join(runDir, 'data');
  const nodeFlags = values['cpu-prof'] === true ? ['--cpu-prof', `--cpu-prof-dir=${profDir}`] : [];
  if (values['cpu-prof'] === true) await rm(profDir, { recursive: true, force: true });
  server = spawnMeasured(process.execPath, [...nodeFlags, 'bin/dppa.js', 'serve', '--data', dataDir, '--grpc-port', '0', '--metrics-port', '0'], adminEnv);
  let log = '';
  server.child.stderr!.on('data', (b: Buffer) => (log += b.toString()));
  const { grpcPort, metricsPort } = await new Promise<{ grpcPort: number; metricsPort: number }>((resolve, reject) => {
    let grpc = 0;
    const timer = setTimeout(() => reject(new Error(`dppa serve did not start in 30 s:\n${log}`)), 30_000);
    lines(server!.child.stdout!, (line) => {
      const g = /^grpc listening on .*:(\d+)$/.exec(line);
      if (g !== null) grpc = Number(g[1]);
      const m = /^metrics listening on http:\/\/.*:(\d+)\/metrics$/.exec(line);
      if (m !== null) {
        clearTimeout(timer);
        resolve({ grpcPort: grpc, metricsPort: Number(m[1]) });
      }
    });
    void server!.done.then((r) => reject(new Error(`dppa serve exited with ${r.code}:\n${log}`)));
  });
  const serverPid = wrappedPid(server.child);
  const address = `127.0.0.1:${grpcPort}`;

  // 4. The job, and a watcher of its events.
  const created = JSON.parse(dppa(['job', 'create', '--server', address, '--base', base, '--parties', PARTIES.join(','), '--rate', RATE, '--method', 'dp', '--dpa', 'off', '--label', 'bench:server', '--json'], adminEnv)) as {
    jobId: string;
    tokens: Record<string, string>;
  };
  const { jobId } = created;
  const events: { type: string; time: string; party?: string; seconds?: number; reason?: string; tensorsDone?: number; tensorsTotal?: number }[] = [];
  watcher = spawn(process.execPath, ['bin/dppa.js', 'job', 'watch', '--server', address, '--job', jobId, '--json'], { cwd: root, env: adminEnv, stdio: ['ignore', 'pipe', 'inherit'] });
  const finished = new Promise<{ type: string; at: number }>((resolve) => {
    lines(watcher!.stdout!, (line) => {
      const ev = JSON.parse(line) as (typeof events)[number];
      events.push(ev);
      if (ev.type === 'merged' || ev.type === 'failed') resolve({ type: ev.type, at: performance.now() });
    });
  });
  const before = await scrape(metricsPort);
  const loadBeforeUpload = load();

  // 5. Three concurrent pushes.
  const t0 = performance.now();
  const pushes = PARTIES.map((p, i) => {
    const run = spawnMeasured(process.execPath, ['bin/dppa.js', 'push', '--server', address, '--job', jobId, '--party', p, '--delta', deltas[i]!, '--json'], { ...process.env, DPPA_TOKEN: created.tokens[p] });
    return run.done.then((m) => ({ ...m, at: performance.now() }));
  });
  const pushed = await Promise.all(pushes);
  for (const [i, m] of pushed.entries()) if (m.code !== 0) throw new Error(`push ${PARTIES[i]} failed (${m.code}):\n${m.stderr}`);
  const uploadSeconds = (Math.max(...pushed.map((m) => m.at)) - t0) / 1000;
  const afterUpload = await scrape(metricsPort);
  const hwmAfterUpload = vmHwmMiB(serverPid);

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
  const mergeTail = lastTensor === undefined ? Number.NaN : (time('merged', 'last') - Date.parse(lastTensor.time)) / 1000;
  const status = JSON.parse(dppa(['job', 'status', '--server', address, '--job', jobId, '--json'], adminEnv)) as { state: string };
  const mergedBytes = await folderBytes(join(dataDir, 'jobs', jobId, 'merged'));
  if (status.state !== 'merged' || mergedBytes < baseBytes * 0.99) throw new Error(`job ${jobId} is ${status.state}, merged folder ${mergedBytes} bytes`);

  // 7. Stop the server: its peak RSS over its whole life.
  server.child.kill('SIGTERM');
  const serverRun = await server.done;
  server = undefined;
  await writeFile(join(runDir, 'server.log'), log);

  // 8. cp -r of the base checkpoint (then its fsync, which the merge also does), same disk.
  const cps: number[] = [];
  const syncs: number[] = [];
  for (let i = 0; i < runs; i++) {
    const copy = join(runDir, 'cp-copy');
    cps.push(measureProcess('cp', ['-r', base, copy]).seconds);
    const files = (await readdir(copy)).map((f) => join(copy, f));
    syncs.push(measureProcess('sync', files).seconds);
    await rm(copy, { recursive: true, force: true });
    console.log(`cp -r ${i + 1}/${runs}: ${cps.at(-1)!.toFixed(2)} s, then sync of the copy ${syncs.at(-1)!.toFixed(2)} s`);
  }

  // The figures.
  const raw = median(raws);
  const cp = median(cps);
  const cpSync = median(cps.map((c, i) => c + syncs[i]!));
  const uploadRatio = raw / uploadSeconds;
  const mergeRatio = mergeSeconds / cp;
  const cpu = (m: Map<string, number>): number => m.get('process_cpu_seconds_total') ?? Number.NaN;
  const mb = (b: number, s: number): string => (b / 1e6 / s).toFixed(0);
  const yes = (ok: boolean): string => (ok ? 'met' : 'NOT met');
  const total = (performance.now() - benchStart) / 1000;

  console.log(`\nServer benchmark: TinyLlama-1.1B shapes (${SHAPE.layers} layers, hidden ${SHAPE.hidden}, intermediate ${SHAPE.intermediate}, vocab ${SHAPE.vocab}, k/v ${KV}×${SHAPE.hidden}),`);
  console.log(`${(PARAMS / 1e9).toFixed(3)}B parameters, bf16, base ${(baseBytes / 1e9).toFixed(2)} GB in ${(await readdir(base)).filter((f) => f.endsWith('.safetensors')).length} shards;`);
  console.log(`3 parties, DP at rate ${RATE} (outside tensors dense), DPA off; .dppa files ${deltas.map((f) => (statSync(f).size / 1e6).toFixed(0)).join(' + ')} = ${(deltaBytes / 1e6).toFixed(0)} MB`);
  console.log(`prune (before the upload, 2 workers each): ${prunes.map((p) => p.seconds.toFixed(1)).join(', ')} s; peak RSS ${Math.max(...prunes.map((p) => p.maxRssMiB)).toFixed(0)} MiB\n`);
  const rows: string[][] = [
    ['measure', 'seconds', 'MB/s', 'reference', 'ref seconds', 'ref MB/s', 'ratio', 'goal', 'status'],
    ['upload, 3 concurrent `dppa push`', uploadSeconds.toFixed(2), mb(deltaBytes, uploadSeconds), 'raw TCP loopback copy', raw.toFixed(2), mb(deltaBytes, raw), `${(100 * uploadRatio).toFixed(1)}%`, '≥ 50%', yes(uploadRatio >= 0.5)],
    ['merge (last upload → merged)', mergeSeconds.toFixed(2), mb(baseBytes, mergeSeconds), '`cp -r` of the base', cp.toFixed(2), mb(baseBytes, cp), `${mergeRatio.toFixed(2)}×`, '≤ 2×', yes(mergeRatio <= 2)],
    ['', '', '', '`cp -r` + sync of the copy', cpSync.toFixed(2), mb(baseBytes, cpSync), `${(mergeSeconds / cpSync).toFixed(2)}×`, '', ''],
    ['server peak RSS (whole life)', '', '', '', '', '', `${serverRun.maxRssMiB.toFixed(0)} MiB`, '< 1024 MiB', yes(serverRun.maxRssMiB < 1024)],
  ];
  const widths = rows[0]!.map((_, j) => Math.max(...rows.map((r) => r[j]!.length)));
  rows.splice(1, 0, widths.map((w) => '-'.repeat(w)));
  for (const r of rows) console.log(`| ${r.map((c, j) => c.padEnd(widths[j]!)).join(' | ')} |`);
  console.log('');
  console.log(`upload as the server saw it (first party joined → last upload complete): ${serverUploadSeconds.toFixed(2)} s (${mb(deltaBytes, serverUploadSeconds)} MB/s)`);
  console.log(`push processes: ${pushed.map((m, i) => `${PARTIES[i]} ${m.seconds.toFixed(2)} s, peak RSS ${m.maxRssMiB.toFixed(0)} MiB, CPU ${m.cpuSeconds.toFixed(1)} s`).join('; ')}`);
  console.log(`merge inside the server (mergeCheckpoint incl. fsync and SHA-256 of the output): ${mergeCore.toFixed(2)} s; dppa_merge_duration_seconds_sum ${afterMerge.get('dppa_merge_duration_seconds_sum')?.toFixed(2)}`);
  console.log(`  of which after the last tensor was written (commit with fsync, SHA-256 of every output file, job state): ${mergeTail.toFixed(2)} s`);
  console.log(`server CPU: upload ${(cpu(afterUpload) - cpu(before)).toFixed(1)} s, merge ${(cpu(afterMerge) - cpu(afterUpload)).toFixed(1)} s, whole life ${serverRun.cpuSeconds.toFixed(1)} s (all threads; 2 cores)`);
  console.log(`server peak RSS: ${hwmAfterUpload.toFixed(0)} MiB after the upload, ${hwmAfterMerge.toFixed(0)} MiB after the merge, ${serverRun.maxRssMiB.toFixed(0)} MiB whole life`);
  console.log(`load average (1, 5, 15 min): start ${loadAtStart}; before the upload ${loadBeforeUpload}; after the merge ${loadAfterMerge}; end ${load()}`);
  console.log(`whole benchmark: ${total.toFixed(0)} s${generated === undefined ? ' (inputs reused)' : ` (generation ${generated.toFixed(0)} s)`}`);
  if (values['cpu-prof'] === true) await summarizeProfiles(profDir);
} finally {
  watcher?.kill('SIGTERM');
  if (server !== undefined) {
    server.child.kill('SIGTERM');
    await server.done.catch(() => undefined);
  }
  if (values.keep !== true) await rm(runDir, { recursive: true, force: true });
  if (values.clean === true) await rm(inputs, { recursive: true, force: true });
}
