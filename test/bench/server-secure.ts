/**
 * `npm run bench:server-secure`: secure aggregation through the server, on the bench:server model (TinyLlama-1.1B
 * shapes, tinyllama-inputs.ts) pruned by DP at rate 0.9: a real `dppa serve`, a job created with `--privacy secure
 * --threshold 2`, three concurrent `dppa push` processes (no evaluation: factors 1). It measures the bytes each party
 * sends (support positions, keys, share boxes, masked words, unmask answers) against its plain sparse upload (its
 * `.dppa` file), the wall time of each phase from the job's events and the parties' progress lines, the server's
 * CPU and peak RSS at each phase's end, and each party's peak RSS and CPU. Last line: the figures as one JSON object.
 *
 *   npm run bench:server-secure [-- --layers 4 --keep --reuse-deltas --clean --clip-bound 0.05]
 *
 * Inputs are shared with bench:server (.bench/server/tinyllama-<layers>l/); run outputs go to
 * .bench/server/secure-run/ and are deleted at the end unless --keep.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { measureProcess } from './measure.js';
import { dppa, lines, load, root, scrape, spawnMeasured, startServer, vmHwmMiB, type Served } from './processes.js';
import { folderBytes, generateTinyLlama, tinyLlama } from './tinyllama-inputs.js';

const { values } = parseArgs({
  options: {
    layers: { type: 'string', default: '22' },
    'clip-bound': { type: 'string', default: '0.05' },
    clean: { type: 'boolean' },
    keep: { type: 'boolean' },
    'reuse-deltas': { type: 'boolean' },
  },
});
const LAYERS = Number(values.layers);
if (!Number.isInteger(LAYERS) || LAYERS < 1)
  throw new RangeError(`--layers: expected an integer ≥ 1, got ${values.layers}`);
const PARTIES = ['math', 'law', 'finance'] as const;
const RATE = '0.9';
const THRESHOLD = '2';
const runDir = join(root, '.bench', 'server', 'secure-run');
const benchStart = performance.now();
const model = tinyLlama(LAYERS);

interface JobEvent {
  type: string;
  time: string;
  phase?: string;
  unionSize?: number;
  seconds?: number;
  reason?: string;
}

/** What the server looked like when an event came: its CPU seconds and peak RSS so far. */
interface AtEvent {
  event: JobEvent;
  cpu: number;
  hwmMiB: number;
}

/** A party's progress lines (stderr of `dppa push --json`), with when they came. */
type Stamped = { at: number; line: string }[];

const loadAtStart = load();
console.log(`load average at start: ${loadAtStart} (2 cores: above 2 means other work competes)`);
const generated = await generateTinyLlama(model);
const base = join(model.dir, 'base');
console.log('building dist/ …');
execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });

const deltas = PARTIES.map((p) => join(runDir, `${p}.dppa`));
const reuse = values['reuse-deltas'] === true;
if (reuse) {
  for (const f of deltas)
    if (!statSync(f, { throwIfNoEntry: false })?.isFile())
      throw new Error(`--reuse-deltas: ${f} is missing (run once with --keep)`);
  for (const d of ['data', ...PARTIES.map((p) => `work-${p}`)])
    await rm(join(runDir, d), { recursive: true, force: true });
} else {
  await rm(runDir, { recursive: true, force: true });
  await mkdir(runDir, { recursive: true });
}
const adminEnv = { ...process.env, DPPA_ADMIN_TOKEN: randomBytes(24).toString('base64url') };
let served: Served | undefined;
let watcher: ChildProcess | undefined;
try {
  for (const [i, p] of PARTIES.entries()) {
    if (reuse) break;
    const args = ['bin/dppa.js', 'prune', '--base', base, '--finetuned', join(model.dir, `ft${i + 1}`)];
    const r = measureProcess(
      process.execPath,
      [...args, '--rate', RATE, '--method', 'dp', '--value-kind', 'delta', '--out', deltas[i]!, '--workers', '2'],
      { cwd: root },
    );
    console.log(`prune ${p.padEnd(7)} ${r.seconds.toFixed(1)} s, ${(statSync(deltas[i]!).size / 1e6).toFixed(0)} MB`);
  }

  served = await startServer(join(runDir, 'data'), adminEnv);
  const { pid: serverPid, metricsPort } = served;
  const address = `127.0.0.1:${served.grpcPort}`;
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
        PARTIES.join(','),
        '--rate',
        RATE,
        '--method',
        'dp',
        '--privacy',
        'secure',
        '--threshold',
        THRESHOLD,
        '--clip-bound',
        values['clip-bound'],
        '--output',
        'dense',
        '--label',
        'bench:server-secure',
        '--json',
      ],
      adminEnv,
    ),
  ) as { jobId: string; tokens: Record<string, string> };
  const { jobId } = created;

  // The job's events, each with the server's CPU seconds and peak RSS when it came.
  const seen: Promise<AtEvent>[] = [];
  const joins: JobEvent[] = [];
  watcher = spawn(process.execPath, ['bin/dppa.js', 'job', 'watch', '--server', address, '--job', jobId, '--json'], {
    cwd: root,
    env: adminEnv,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const finished = new Promise<string>((resolve) => {
    lines(watcher!.stdout!, (line) => {
      const event = JSON.parse(line) as JobEvent;
      if (event.type === 'partyJoined' || event.type === 'uploadComplete') joins.push(event);
      if (event.type === 'securePhaseClosed' || event.type === 'merged' || event.type === 'failed') {
        const hwmMiB = vmHwmMiB(serverPid);
        seen.push(scrape(metricsPort).then((m) => ({ event, cpu: m.get('process_cpu_seconds_total')!, hwmMiB })));
      }
      if (event.type === 'merged' || event.type === 'failed') resolve(event.type === 'merged' ? 'merged' : line);
    });
  });
  const before = await scrape(metricsPort);
  const loadBeforeUpload = load();
  const t0 = Date.now();

  const stamped: Stamped[] = PARTIES.map(() => []);
  const pushed = await Promise.all(
    PARTIES.map((p, i) => {
      const work = join(runDir, `work-${p}`);
      const run = spawnMeasured(
        process.execPath,
        ['bin/dppa.js', 'push', '--server', address, '--job', jobId, '--party', p, '--delta', deltas[i]!].concat([
          '--work-dir',
          work,
          '--json',
        ]),
        { ...process.env, DPPA_TOKEN: created.tokens[p] },
      );
      lines(run.child.stderr!, (line) => stamped[i]!.push({ at: performance.now(), line }));
      return run.done;
    }),
  );
  for (const [i, m] of pushed.entries())
    if (m.code !== 0) throw new Error(`push ${PARTIES[i]} failed (${m.code}):\n${m.stderr}`);
  const end = await finished;
  if (end !== 'merged') throw new Error(`the secure job failed: ${end}`);
  const atEvents = await Promise.all(seen);
  const after = await scrape(metricsPort);
  const loadAfterMerge = load();
  const status = JSON.parse(dppa(['job', 'status', '--server', address, '--job', jobId, '--json'], adminEnv)) as {
    state: string;
    parties: { name: string; bytesReceived: number }[];
  };
  served.server.child.kill('SIGTERM');
  const serverRun = await served.server.done;
  served = undefined;

  // Phases: the server's (from its events), and the party's union download and masked upload (from its lines).
  const closed = atEvents.filter((e) => e.event.type === 'securePhaseClosed');
  const merged = atEvents.find((e) => e.event.type === 'merged')!;
  const unionSize = closed.find((e) => e.event.phase === 'support')!.event.unionSize!;
  const lineAt = (i: number, re: RegExp): number => {
    const hit = stamped[i]!.find((s) => re.test(s.line));
    if (hit === undefined) throw new Error(`party ${PARTIES[i]}: no line ${re} in\n${pushed[i]!.stderr}`);
    return hit.at;
  };
  const partyPhase = (from: RegExp, to: RegExp): number[] =>
    PARTIES.map((_, i) => (lineAt(i, to) - lineAt(i, from)) / 1000);
  // `dppa push --json` progress lines: {"step":"received"} (shares), {"step":"union"}, {"step":"maskedComplete"}.
  const unionDownload = partyPhase(/"step":"received"/, /"step":"union"/);
  const maskedUpload = partyPhase(/"step":"union"/, /"step":"maskedComplete"/);
  const lastUnmask = closed.find((e) => e.event.phase === 'unmask')!;
  const mergeSeconds = (Date.parse(merged.event.time) - Date.parse(lastUnmask.event.time)) / 1000;
  const cpuAt = [before.get('process_cpu_seconds_total')!, ...closed.map((e) => e.cpu), merged.cpu];
  // SUPPORT split: the supports' upload (first party joined → last support held), then the union's build.
  const eventTimes = (type: string): number[] => joins.filter((e) => e.type === type).map((e) => Date.parse(e.time));
  const supportsHeld = Math.max(...eventTimes('uploadComplete'));
  const supportUploadSeconds = (supportsHeld - Math.min(...eventTimes('partyJoined'))) / 1000;
  const unionBuildSeconds = (Date.parse(closed[0]!.event.time) - supportsHeld) / 1000;
  const phases = [
    ...closed.map((e, k) => ({
      phase: e.event.phase!,
      seconds: e.event.seconds!,
      serverCpu: cpuAt[k + 1]! - cpuAt[k]!,
      serverHwmMiB: e.hwmMiB,
    })),
    { phase: 'merge', seconds: mergeSeconds, serverCpu: merged.cpu - cpuAt.at(-2)!, serverHwmMiB: merged.hwmMiB },
  ];

  // Bytes per party: its support as the server counted it; the rest from the server's counters (every party sends
  // the same: 4 bytes a word of U, its two public keys, a box per peer, its unmask answer), divided by the parties.
  const metric = (phase: string): number =>
    ((after.get(`dppa_secure_bytes_total{phase="${phase}"}`) ?? 0) -
      (before.get(`dppa_secure_bytes_total{phase="${phase}"}`) ?? 0)) /
    PARTIES.length;
  const masked = metric('masked_input');
  const small = { keys: metric('keys'), shares: metric('shares'), unmask: metric('unmask') };
  const bytes = PARTIES.map((p, i) => {
    const support = status.parties.find((q) => q.name === p)!.bytesReceived;
    const plain = statSync(deltas[i]!).size;
    const total = support + masked + small.keys + small.shares + small.unmask;
    return { party: p, plain, support, masked, ...small, total, ratio: total / plain };
  });

  const mb = (b: number): string => (b / 1e6).toFixed(1);
  console.log(
    `\nSecure aggregation through the server: TinyLlama-1.1B shapes, ${LAYERS} layers, ${(model.params / 1e9).toFixed(3)}B parameters, base ${(
      (await folderBytes(base)) / 1e9
    ).toFixed(
      2,
    )} GB; 3 parties, DP at rate ${RATE}, threshold ${THRESHOLD}, clip bound ${values['clip-bound']}; |U| = ${unionSize} positions`,
  );
  console.log(
    '\n| party | plain .dppa MB | support MB | masked MB | keys B | shares B | unmask B | total MB | vs plain |',
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const b of bytes)
    console.log(
      `| ${b.party} | ${mb(b.plain)} | ${mb(b.support)} | ${mb(b.masked)} | ${b.keys.toFixed(0)} | ${b.shares.toFixed(0)} | ${b.unmask.toFixed(0)} | ${mb(b.total)} | ${b.ratio.toFixed(2)}× |`,
    );
  console.log('\n| phase (server events) | wall s | server CPU s | server peak RSS so far MiB |');
  console.log('| --- | --- | --- | --- |');
  for (const p of phases)
    console.log(`| ${p.phase} | ${p.seconds.toFixed(2)} | ${p.serverCpu.toFixed(1)} | ${p.serverHwmMiB.toFixed(0)} |`);
  console.log(
    `\nsupport phase: supports uploaded in ${supportUploadSeconds.toFixed(2)} s (first party joined → last support held), union built in ${unionBuildSeconds.toFixed(2)} s (→ SUPPORT closed)`,
  );
  console.log(
    `parties (math, law, finance): union download ${unionDownload.map((s) => s.toFixed(2)).join(', ')} s; masked upload ${maskedUpload.map((s) => s.toFixed(2)).join(', ')} s`,
  );
  console.log(
    `push processes: ${pushed.map((m, i) => `${PARTIES[i]} ${m.seconds.toFixed(1)} s, peak RSS ${m.maxRssMiB.toFixed(0)} MiB, CPU ${m.cpuSeconds.toFixed(1)} s`).join('; ')}`,
  );
  console.log(
    `server: CPU ${serverRun.cpuSeconds.toFixed(1)} s whole life, peak RSS ${serverRun.maxRssMiB.toFixed(0)} MiB whole life`,
  );
  console.log(
    `load average (1, 5, 15 min): start ${loadAtStart}; before the pushes ${loadBeforeUpload}; after the merge ${loadAfterMerge}; end ${load()}`,
  );
  console.log(
    `pushes to merged: ${((Date.parse(merged.event.time) - t0) / 1000).toFixed(1)} s; whole benchmark ${((performance.now() - benchStart) / 1000).toFixed(0)} s${generated === undefined ? ' (inputs reused)' : ''}`,
  );
  console.log(
    JSON.stringify({
      layers: LAYERS,
      union_size: unionSize,
      bytes,
      phases,
      support_upload_s: supportUploadSeconds,
      union_build_s: unionBuildSeconds,
      union_download_s: unionDownload,
      masked_upload_s: maskedUpload,
      party_peak_rss_mib: pushed.map((m) => m.maxRssMiB),
      party_cpu_s: pushed.map((m) => m.cpuSeconds),
      server_cpu_s: serverRun.cpuSeconds,
      server_peak_rss_mib: serverRun.maxRssMiB,
    }),
  );
} finally {
  watcher?.kill('SIGTERM');
  if (served !== undefined) {
    served.server.child.kill('SIGTERM');
    await served.server.done.catch(() => undefined);
  }
  if (values.keep !== true) await rm(runDir, { recursive: true, force: true });
  if (values.clean === true) await rm(model.dir, { recursive: true, force: true });
}
