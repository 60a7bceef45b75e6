/**
 * Helpers of the whole-process benchmarks (bench:server, bench:server-secure): run `dppa` processes under a python3
 * wrapper that reports their peak RSS and CPU time, sample a live process's RSS, start `dppa serve`, scrape its
 * metrics.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { createInterface } from 'node:readline';

/** The repository root (every process runs there). */
export const root = new URL('../..', import.meta.url).pathname;

/** What the python3 wrapper reports about the process it ran. */
export interface Measured {
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

export function spawnMeasured(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): { child: ChildProcess; done: Promise<Measured> } {
  const child = spawn('python3', ['-c', WRAPPER, cmd, ...args], {
    cwd: root,
    env,
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
  });
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
export function wrappedPid(wrapper: ChildProcess): number {
  const kids = readFileSync(`/proc/${wrapper.pid}/task/${wrapper.pid}/children`, 'utf8').trim();
  return Number(kids.split(/\s+/)[0]);
}

/**
 * CPU seconds (user + system) of a live process's main thread and of its other threads together (the libuv thread
 * pool's file writes and fsyncs, V8's concurrent GC helpers), from /proc.
 */
export function threadCpu(pid: number): { main: number; others: number } {
  const r = { main: 0, others: 0 };
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    } catch {
      continue; // The thread ended.
    }
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const seconds = (Number(f[11]) + Number(f[12])) / CLOCK_TICKS;
    if (Number(tid) === pid) r.main += seconds;
    else r.others += seconds;
  }
  return r;
}

/** Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux). */
const CLOCK_TICKS = 100;

/** Peak RSS so far of a live process (VmHWM), in MiB. */
export function vmHwmMiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m === null ? Number.NaN : Number(m[1]) / 1024;
}

/** Samples a live process's resident set (VmRSS) every 100 ms; `stop()` gives the largest seen, in MiB. */
export function sampleRss(pid: number): { stop(): number } {
  let max = 0;
  const read = (): void => {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (m !== null) max = Math.max(max, Number(m[1]) / 1024);
    } catch {
      // The process is gone.
    }
  };
  read();
  const timer = setInterval(read, 100);
  return {
    stop: () => {
      clearInterval(timer);
      read();
      return max;
    },
  };
}

export function lines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  createInterface({ input: stream }).on('line', onLine);
}

/** Runs `dppa ARGS` to its end; its stdout. */
export function dppa(args: string[], env: NodeJS.ProcessEnv): string {
  return execFileSync(process.execPath, ['bin/dppa.js', ...args], {
    cwd: root,
    env,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
}

/** The server's Prometheus metrics, by series (`name{labels}`). */
export async function scrape(port: number): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const m = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const i = line.lastIndexOf(' ');
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

/** The load average (1, 5, 15 min). */
export const load = (): string =>
  loadavg()
    .map((x) => x.toFixed(2))
    .join(' ');

/** A measured `dppa serve`, once it listens. */
export interface Served {
  server: { child: ChildProcess; done: Promise<Measured> };
  pid: number;
  grpcPort: number;
  metricsPort: number;
  /** Its log so far (JSON lines). */
  log: () => string;
}

/** Starts `dppa serve --data DIR` on free ports (node flags before the script, e.g. --cpu-prof). */
export async function startServer(dataDir: string, env: NodeJS.ProcessEnv, nodeFlags: string[] = []): Promise<Served> {
  const server = spawnMeasured(
    process.execPath,
    [...nodeFlags, 'bin/dppa.js', 'serve', '--data', dataDir, '--grpc-port', '0', '--metrics-port', '0'],
    env,
  );
  let log = '';
  server.child.stderr!.on('data', (b: Buffer) => (log += b.toString()));
  const { grpcPort, metricsPort } = await new Promise<{ grpcPort: number; metricsPort: number }>((resolve, reject) => {
    let grpc = 0;
    const timer = setTimeout(() => reject(new Error(`dppa serve did not start in 30 s:\n${log}`)), 30_000);
    // Its log (JSON lines on stderr) says where it listens.
    lines(server.child.stderr!, (line) => {
      const g = /"msg":"grpc listening on [^"]*:(\d+)"/.exec(line);
      if (g !== null) grpc = Number(g[1]);
      const m = /"msg":"metrics listening on http:\/\/[^"]*:(\d+)\/metrics"/.exec(line);
      if (m !== null) {
        clearTimeout(timer);
        resolve({ grpcPort: grpc, metricsPort: Number(m[1]) });
      }
    });
    void server.done.then((r) => reject(new Error(`dppa serve exited with ${r.code}:\n${log}`)));
  });
  return { server, pid: wrappedPid(server.child), grpcPort, metricsPort, log: () => log };
}
