import { writeFile } from 'node:fs/promises';
import { num, parse, required } from '../args.js';
import { pruneFlags, pruneSettings } from '../prune-flags.js';
import { cancellable, note, out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { pruneToFile } from '../../prune/prune-to-file.js';

const help = `Usage: dppa prune --base DIR --finetuned DIR --rate R --out FILE.dppa [options]

Computes the delta of a fine-tuned checkpoint against its base, prunes it and
writes it as a partitioned sparse delta (.dppa).

Required:
  --base DIR               base checkpoint (folder with model.safetensors or a sharded index)
  --finetuned DIR          fine-tuned checkpoint of the same base
  --rate R                 target pruning rate in [0, 1), e.g. 0.9 keeps about 10%
  --out FILE               the .dppa file to write (written whole or not at all)

Method:
  --method M               dp (default), magnitude, owl, dare
  --levels L1,L2,...       partition levels, decreasing, ending at --rate (default 0.9, 0.8, ... down to R)
  --outside P              outside tensors (embeddings, norms, lm_head): dense (default), magnitude, skip
  --significance K         DP significance: magnitude (default, the paper) or count (released code)
  --lambda X               largest rate fluctuation (default 0.08)
  --layer-outlier-factor N outlier factor at model-layer level (default 5; the released code used 3)
  --linear-outlier-factor N outlier factor at linear-layer level (default 5)
  --layer-pattern RE       regular expression whose group 1 is the layer number
                           (default matches layers.N., h.N. and blocks.N.)
  --seed N                 DARE seed (default 0)
  --dare-rescale R         inverse (default, 1/(1-p)) or l1 (match the L1 norm, as mergekit)
  --value-dtype D          bf16 (default), f16, f32
  --vocab-mismatch M       error (default) or truncate: compare only the base's rows of
                           tensors whose fine-tuned copy has extra rows (resized vocabulary)

Other:
  --report FILE            write a JSON report: { method, rate, levels, tensors: [...] }
  --workers N              worker threads (default: up to 2); results do not depend on it
  --json                   print the report as JSON on stdout instead of a summary
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 3 bad or mismatched checkpoints, 130 interrupted.
`;

export const pruneCommand: Command = {
  name: 'prune',
  summary: 'prune a fine-tuned delta into a partitioned sparse .dppa file',
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      base: { type: 'string' },
      finetuned: { type: 'string' },
      rate: { type: 'string' },
      out: { type: 'string' },
      ...pruneFlags,
      report: { type: 'string' },
      json: { type: 'boolean' },
    });
    return cancellable(async (signal, progress) => {
      const report = await pruneToFile({
        base: required(v.base, 'base'),
        finetuned: required(v.finetuned, 'finetuned'),
        out: required(v.out, 'out'),
        rate: num(required(v.rate, 'rate'), 'rate', { min: 0, below: 1 })!,
        ...pruneSettings(v),
        signal,
        onProgress: (p) => progress.update(p.phase === 'prune' ? 'prune       ' : 'significance', p.bytesDone, p.bytesTotal, p.tensor),
      });
      progress.done();
      if (v.report !== undefined) await writeFile(v.report, `${JSON.stringify(report, null, 2)}\n`);
      if (v.json === true) {
        out(JSON.stringify(report));
      } else {
        const kept = report.tensors.reduce((a, t) => a + t.kept, 0);
        const total = report.tensors.reduce((a, t) => a + t.numel, 0);
        out(`${report.method} at rate ${report.rate}: kept ${kept} of ${total} entries (${((100 * kept) / Math.max(1, total)).toFixed(2)}%) in ${report.tensors.length} tensors, levels ${report.levels.join(', ')}`);
        out(`wrote ${report.file} (${report.fileBytes} bytes)`);
      }
      for (const t of report.truncated) note(`note: ${t}: fine-tuned tensor has extra rows; compared on the base's rows only (--vocab-mismatch truncate)`);
      for (const t of report.droppedWhole) note(`note: ${t}: pruning rate reached 1 at the target level; the layer's delta is dropped whole`);
      return EXIT.ok;
    });
  },
};
