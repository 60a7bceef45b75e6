import { number, numbers, text, toggle } from '../../../proto/cli/flag-table.js';
import { defined } from '../args.js';
import { cancellable, defineCommand, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { applyDelta } from '../../apply.js';

const REQUIRED = 'Required';
const OPTIONS = 'Options';

/** `dppa apply`: see its help text. */
export const applyCommand = defineCommand({
  name: 'apply',
  summary: 'write base + (amplified) pruned delta as a checkpoint',
  usage: '--base DIR --delta FILE.dppa --out DIR [options]',
  description: `Writes base + scale * sum_p factor_p * delta|partition p as a checkpoint in the
base's layout and dtype (shards, index, config and tokenizer files copied).
This is the model a party evaluates during the DPA search.`,
  flags: {
    base: text('DIR', 'base checkpoint the delta was made against', { required: true, group: REQUIRED, path: 'input' }),
    delta: text('FILE', 'the .dppa file', { required: true, group: REQUIRED, path: 'input' }),
    out: text('DIR', 'output folder (appears only when complete)', { required: true, group: REQUIRED, path: 'output' }),
    factors: numbers('F1,F2,..', 'one amplification factor per partition, partition 1 first (default all 1)', {}, { group: OPTIONS }),
    scale: number('C', 'weight of the whole delta (default 1)', {}, { group: OPTIONS }),
    'outside-by-max': toggle('scale outside tensors by the largest factor (the released code) instead of 1', { group: OPTIONS }),
    overwrite: toggle('replace --out if it exists', { group: OPTIONS }),
    json: toggle('print the result as JSON', { group: OPTIONS }),
  },
  after: 'Exit codes: 0 ok, 2 bad command line (or --out exists), 3 missing or bad delta, or a delta made against another base.',
  action: (v) =>
    cancellable(async (signal, progress) => {
      const report = await applyDelta({
        base: v.base,
        delta: v.delta,
        out: v.out,
        ...defined({ factors: v.factors, scale: v.scale }),
        outsideByMax: v['outside-by-max'],
        overwrite: v.overwrite,
        signal,
        onProgress: (p) => progress.update('apply', p.tensorsDone, p.tensorsTotal, p.tensor, 'count'),
      });
      progress.done();
      if (v.json) out(JSON.stringify(report));
      else out(`wrote ${report.out}: ${report.tensorsChanged} tensors changed, ${report.tensorsCopied} copied, factors ${report.factors.join(', ')}, scale ${report.scale}`);
      return EXIT.ok;
    }),
});
