/** Helpers for benchmarks: run whole processes, time them, read their peak RSS; medians. */
import { spawnSync } from 'node:child_process';

/** Wall time, CPU time (user + system, all threads) and peak RSS of one whole process (measured by a python3 wrapper, which every bench machine has). */
export function measureProcess(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): { seconds: number; cpuSeconds: number; maxRssMiB: number } {
  const wrapper = [
    'import resource, subprocess, sys, time',
    't = time.perf_counter()',
    'r = subprocess.run(sys.argv[1:])',
    'dt = time.perf_counter() - t',
    'u = resource.getrusage(resource.RUSAGE_CHILDREN)',
    'print(f"{dt} {u.ru_maxrss} {u.ru_utime + u.ru_stime}", file=sys.stderr)',
    'sys.exit(r.returncode)',
  ].join('\n');
  const r = spawnSync('python3', ['-c', wrapper, cmd, ...args], {
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    encoding: 'utf8',
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}):\n${r.stderr}`);
  const last = r.stderr.trim().split('\n').at(-1)!.split(' ');
  return { seconds: Number(last[0]), cpuSeconds: Number(last[2]), maxRssMiB: Number(last[1]) / 1024 };
}

/** CPU seconds (user + system, all threads) this process has used so far. */
export function cpuSeconds(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** Median of a list of numbers. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** A V8 CPU profile, as `--cpu-prof` writes it or the inspector's Profiler.stop returns it. */
export interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number } }[];
  samples: number[];
  timeDeltas: number[];
}

/** Prints the functions with the most self time of a profile; `prefix` is cut from their URLs. */
export function printTopSelfTime(title: string, p: CpuProfile, prefix = `file://${process.cwd()}/`): void {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  let total = 0;
  p.samples.forEach((id, i) => {
    const n = byId.get(id)!;
    const dt = p.timeDeltas[i] ?? 0;
    const url = n.callFrame.url.replace(prefix, '');
    const key = `${n.callFrame.functionName || '(anonymous)'} ${url}:${n.callFrame.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + dt);
    total += dt;
  });
  const top = [...self].sort((a, b) => b[1] - a[1]).slice(0, 12);
  console.log(`\n${title}: ${(total / 1e6).toFixed(1)} s sampled; top self time:`);
  for (const [k, us] of top)
    console.log(`  ${((100 * us) / total).toFixed(1).padStart(5)}%  ${(us / 1e6).toFixed(2).padStart(6)} s  ${k}`);
}

/**
 * The reference for a dense merge beside `cp -r` (the Node I/O floor, bench:server's `node_io_floor_s`): a folder's
 * files copied file by file through a 16 MiB buffer in a Node process, hashed (SHA-256) and fsynced: what a dense
 * merge must do besides the merge itself.
 */
const NODE_COPY = `
const fs = require('node:fs'), path = require('node:path'), crypto = require('node:crypto');
const [from, to] = process.argv.slice(1);
fs.mkdirSync(to, { recursive: true });
const buf = Buffer.allocUnsafeSlow(16 << 20);
for (const f of fs.readdirSync(from)) {
  const a = fs.openSync(path.join(from, f), 'r'), b = fs.openSync(path.join(to, f), 'w');
  const hash = crypto.createHash('sha256');
  for (let pos = 0, n; (n = fs.readSync(a, buf, 0, buf.length, pos)) > 0; pos += n) { fs.writeSync(b, buf, 0, n, pos); hash.update(buf.subarray(0, n)); }
  hash.digest();
  fs.fsyncSync(b);
  fs.closeSync(a);
  fs.closeSync(b);
}`;

/** Wall seconds of the Node I/O floor ({@link NODE_COPY}) copying the files of `from` into `to`, in a child process. */
export function nodeCopySeconds(from: string, to: string): number {
  return measureProcess(process.execPath, ['-e', NODE_COPY, from, to]).seconds;
}
