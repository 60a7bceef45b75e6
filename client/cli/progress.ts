/**
 * A progress line on a terminal (bar, item, bytes, ETA), redrawn at most ten
 * times a second; silent when stderr is not a terminal, so pipes and logs stay clean.
 */

/** Formats a byte count for people: 1.5 GB. */
export function formatBytes(n: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Formats a duration for people: 0.3s, 42s, 1m52s. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '--';
  const s = ms / 1000;
  if (s < 9.95) return `${s.toFixed(1)}s`;
  if (s < 59.5) return `${Math.round(s)}s`;
  const whole = Math.round(s);
  return `${Math.floor(whole / 60)}m${String(whole % 60).padStart(2, '0')}s`;
}

/** One progress line. */
export class ProgressLine {
  private readonly enabled: boolean;
  private readonly started = Date.now();
  private last = 0;
  private drawn = false;

  constructor(
    private readonly stream: NodeJS.WriteStream = process.stderr,
    enabled?: boolean,
  ) {
    this.enabled = enabled ?? stream.isTTY;
  }

  /** Redraws the line: `label [####----] 40% item  done/total  ETA`. */
  update(label: string, done: number, total: number, item: string, unit: 'bytes' | 'count' = 'bytes'): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 100 && done < total) return;
    this.last = now;
    const frac = total > 0 ? Math.min(1, done / total) : 1;
    const width = 24;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '-');
    const elapsed = (now - this.started) / 1000;
    const eta = frac > 0 ? (elapsed * (1 - frac)) / frac : Infinity;
    const amount = unit === 'bytes' ? `${formatBytes(done)}/${formatBytes(total)}` : `${done}/${total}`;
    const cols = this.stream.columns || 100;
    const line = `${label} [${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${amount} ETA ${formatDuration(eta * 1000)} ${item}`;
    this.stream.write(`\r${line.slice(0, cols - 1).padEnd(cols - 1)}`);
    this.drawn = true;
  }

  /** Clears the line. */
  done(): void {
    if (this.drawn) this.stream.write(`\r${' '.repeat((this.stream.columns || 100) - 1)}\r`);
    this.drawn = false;
  }
}
