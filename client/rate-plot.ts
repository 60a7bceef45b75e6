/**
 * An SVG chart of the pruning rate of every linear layer against its model
 * layer, one line per kind of linear layer (q_proj, k_proj, …): the left of
 * the paper's Figure 1.
 */
import type { DeltaSummary } from './inspect.js';

const COLORS = [
  '#1f77b4',
  '#ff7f0e',
  '#2ca02c',
  '#d62728',
  '#9467bd',
  '#8c564b',
  '#e377c2',
  '#7f7f7f',
  '#bcbd22',
  '#17becf',
];

/** The kind of a linear layer: its name without the layer prefix, e.g. `self_attn.q_proj.weight`. */
function kindOf(name: string, layer: number): string {
  const marker = `.${layer}.`;
  const i = name.indexOf(marker);
  return i < 0 ? name : name.slice(i + marker.length);
}

function escapeXml(s: string): string {
  return s.replace(/[<>&"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', '"': '&quot;' })[c]!);
}

/** Renders the chart; an empty chart (with a note) when the delta has no linear layers. */
export function ratePlotSvg(summary: DeltaSummary): string {
  const linears = summary.tensors.filter((t) => t.kind === 'linear' && t.layer >= 0);
  const series = new Map<string, { layer: number; rate: number }[]>();
  for (const t of linears) {
    const k = kindOf(t.name, t.layer);
    series.set(k, [...(series.get(k) ?? []), { layer: t.layer, rate: t.levelRates.at(-1)! }]);
  }
  const W = 720;
  const H = 420;
  const m = { left: 60, right: 190, top: 40, bottom: 50 };
  const layers = linears.map((t) => t.layer);
  const rates = linears.map((t) => t.levelRates.at(-1)!);
  const x0 = Math.min(0, ...layers);
  const x1 = Math.max(1, ...layers);
  const yPad = 0.02;
  const y0 = Math.max(0, Math.min(summary.rate, ...rates) - yPad);
  const y1 = Math.min(1, Math.max(summary.rate, ...rates) + yPad);
  const sx = (x: number): number => m.left + ((x - x0) / (x1 - x0)) * (W - m.left - m.right);
  const sy = (y: number): number => H - m.bottom - ((y - y0) / Math.max(1e-9, y1 - y0)) * (H - m.top - m.bottom);
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2 - 80}" y="22" font-size="14">${escapeXml(`Pruning rate per linear layer (${summary.method}, target ${summary.rate})`)}</text>`,
    `<line x1="${m.left}" y1="${sy(y0)}" x2="${W - m.right}" y2="${sy(y0)}" stroke="black"/>`,
    `<line x1="${m.left}" y1="${sy(y0)}" x2="${m.left}" y2="${sy(y1)}" stroke="black"/>`,
    `<line x1="${m.left}" y1="${sy(summary.rate)}" x2="${W - m.right}" y2="${sy(summary.rate)}" stroke="#999" stroke-dasharray="4 3"/>`,
    `<text x="${(m.left + W - m.right) / 2 - 30}" y="${H - 12}">model layer</text>`,
    `<text x="14" y="${(m.top + H - m.bottom) / 2}" transform="rotate(-90 14 ${(m.top + H - m.bottom) / 2})">pruning rate</text>`,
  ];
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    parts.push(`<text x="${m.left - 44}" y="${sy(y) + 4}">${y.toFixed(3)}</text>`);
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = x0; x <= x1; x += step) parts.push(`<text x="${sx(x) - 4}" y="${H - m.bottom + 16}">${x}</text>`);
  if (linears.length === 0) parts.push(`<text x="${m.left + 20}" y="${H / 2}">no linear layers in this delta</text>`);
  [...series].forEach(([kind, pts], i) => {
    const color = COLORS[i % COLORS.length]!;
    pts.sort((a, b) => a.layer - b.layer);
    parts.push(
      `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${pts.map((p) => `${sx(p.layer).toFixed(1)},${sy(p.rate).toFixed(1)}`).join(' ')}"/>`,
    );
    for (const p of pts)
      parts.push(`<circle cx="${sx(p.layer).toFixed(1)}" cy="${sy(p.rate).toFixed(1)}" r="2.5" fill="${color}"/>`);
    parts.push(`<rect x="${W - m.right + 12}" y="${m.top + i * 18}" width="10" height="10" fill="${color}"/>`);
    parts.push(`<text x="${W - m.right + 28}" y="${m.top + i * 18 + 9}">${escapeXml(kind)}</text>`);
  });
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}
