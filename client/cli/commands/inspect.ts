import { writeFile } from 'node:fs/promises';
import { text, toggle } from '../../../proto/cli/flag-table.js';
import { defineCommand, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { formatBytes } from '../progress.js';
import { inspectDelta } from '../../inspect.js';
import { ratePlotSvg } from '../../rate-plot.js';

/** `dppa inspect`: see its help text. */
export const inspectCommand = defineCommand({
  name: 'inspect',
  summary: 'show what a .dppa file holds (rates, kept counts, sizes); plot the rates',
  usage: 'FILE.dppa [--json] [--plot FILE.svg]',
  description: `Reads a pruned delta, checking every chunk, and shows its header, the pruning
rate of every tensor, the entries kept per partition and the sizes.`,
  positionals: [{ name: 'FILE', help: 'the .dppa file', path: 'input' }],
  flags: {
    json: toggle('print the summary as JSON'),
    plot: text('FILE', 'write an SVG chart of the pruning rate of each linear layer by model layer', {
      path: 'output',
    }),
    overwrite: toggle('replace --plot if it exists'),
  },
  after: 'Exit codes: 0 ok, 2 bad command line (or --plot exists), 3 missing, malformed or damaged file.',
  async action(v, [file]) {
    const summary = await inspectDelta(file!);
    if (v.plot !== undefined) await writeFile(v.plot, ratePlotSvg(summary));
    if (v.json) {
      out(JSON.stringify(summary));
      return EXIT.ok;
    }
    const sent = summary.tensors.filter((t) => t.sent);
    const kept = sent.reduce((a, t) => a + t.keptPerPartition.reduce((x, y) => x + y, 0), 0);
    const numel = summary.tensors.reduce((a, t) => a + t.numel, 0);
    out(`file         ${summary.file} (${formatBytes(summary.fileBytes)})`);
    out(`base         ${summary.baseFingerprint}`);
    out(`method       ${summary.method}, target rate ${summary.rate}, levels ${summary.levels.join(', ')}`);
    out(
      `options      ${Object.entries(summary.options)
        .map(([k, x]) => `${k}=${x}`)
        .join(' ')}`,
    );
    out(
      `values       ${summary.valueDtype} ${summary.valueKind}; kept ${kept} of ${numel} entries (${((100 * kept) / Math.max(1, numel)).toFixed(2)}%), ${(summary.fileBytes / Math.max(1, kept)).toFixed(2)} bytes per kept entry`,
    );
    out('');
    out(
      `${'tensor'.padEnd(48)} ${'layer'.padStart(5)} ${'rate'.padStart(7)} ${'kept per partition'.padEnd(28)} ${'size'.padStart(9)}`,
    );
    for (const t of summary.tensors) {
      const parts = t.sent
        ? t.keptPerPartition
            .map((k, p) => `${p}:${k}`)
            .filter((_, p) => p > 0 || t.kind === 'outside')
            .join(' ')
        : 'not sent';
      out(
        `${t.name.padEnd(48)} ${String(t.layer).padStart(5)} ${t.levelRates.at(-1)!.toFixed(4).padStart(7)} ${parts.padEnd(28)} ${formatBytes(t.bytes).padStart(9)}`,
      );
    }
    if (v.plot !== undefined) out(`\nwrote ${v.plot}`);
    return EXIT.ok;
  },
});
