import { writeFile } from 'node:fs/promises';
import { number, text, toggle } from '../../../proto/cli/flag-table.js';
import { pruneFlags, pruneSettings } from '../prune-flags.js';
import { cancellable, defineCommand, note, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { pruneToFile } from '../../prune/prune-to-file.js';

const REQUIRED = 'Required';
const OTHER = 'Other';

/** `dppa prune`: see its help text. */
export const pruneCommand = defineCommand({
  name: 'prune',
  summary: 'prune a fine-tuned delta into a partitioned sparse .dppa file',
  usage: '--base DIR --finetuned DIR --rate R --out FILE.dppa [options]',
  description: `Computes the delta of a fine-tuned checkpoint against its base, prunes it and
writes it as a partitioned sparse delta (.dppa).`,
  flags: {
    base: text('DIR', 'base checkpoint (folder with model.safetensors or a sharded index)', {
      required: true,
      group: REQUIRED,
      path: 'input',
    }),
    finetuned: text('DIR', 'fine-tuned checkpoint of the same base', {
      required: true,
      group: REQUIRED,
      path: 'input',
    }),
    rate: number(
      'R',
      'target pruning rate in [0, 1), e.g. 0.9 keeps about 10%',
      { min: 0, below: 1 },
      { required: true, group: REQUIRED },
    ),
    out: text('FILE', 'the .dppa file to write (written whole or not at all)', {
      required: true,
      group: REQUIRED,
      path: 'output',
    }),
    ...pruneFlags,
    report: text('FILE', 'write a JSON report: { method, rate, levels, tensors: [...] }', {
      group: OTHER,
      path: 'output',
    }),
    overwrite: toggle('replace --out (and --report) if they exist', { group: OTHER }),
    json: toggle('print the report as JSON on stdout instead of a summary', { group: OTHER }),
  },
  after:
    'Exit codes: 0 ok, 2 bad command line (or --out exists), 3 missing, bad or mismatched checkpoints, 130 interrupted.',
  action: (v) =>
    cancellable(async (signal, progress) => {
      const report = await pruneToFile({
        base: v.base,
        finetuned: v.finetuned,
        out: v.out,
        rate: v.rate,
        ...pruneSettings(v),
        signal,
        onProgress: (p) =>
          progress.update(p.phase === 'prune' ? 'prune       ' : 'significance', p.bytesDone, p.bytesTotal, p.tensor),
      });
      progress.done();
      if (v.report !== undefined) await writeFile(v.report, `${JSON.stringify(report, null, 2)}\n`);
      if (v.json) {
        out(JSON.stringify(report));
      } else {
        const kept = report.tensors.reduce((a, t) => a + t.kept, 0);
        const total = report.tensors.reduce((a, t) => a + t.numel, 0);
        out(
          `${report.method} at rate ${report.rate}: kept ${kept} of ${total} entries (${((100 * kept) / Math.max(1, total)).toFixed(2)}%) in ${report.tensors.length} tensors, levels ${report.levels.join(', ')}`,
        );
        out(`wrote ${report.file} (${report.fileBytes} bytes)`);
      }
      for (const t of report.truncated)
        note(
          `note: ${t}: fine-tuned tensor has extra rows; compared on the base's rows only (--vocab-mismatch truncate)`,
        );
      for (const t of report.droppedWhole)
        note(`note: ${t}: pruning rate reached 1 at the target level; the layer's delta is dropped whole`);
      return EXIT.ok;
    }),
});
