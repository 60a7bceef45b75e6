import { number, numbers, text, toggle } from '../../../proto/cli/flag-table.js';
import { applyPatch } from '../../../proto/patch/index.js';
import { defined } from '../args.js';
import { cancellable, defineCommand, out } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { applyDelta } from '../../apply.js';

const REQUIRED = 'Required';
const OPTIONS = 'Options';

/** `dppa apply`: see its help text. */
export const applyCommand = defineCommand({
  name: 'apply',
  summary: 'write base + (amplified) pruned delta as a checkpoint',
  usage:
    '--base DIR --delta FILE.dppa --out DIR [options]\ndppa apply --base DIR --patch FILE.dppa --out DIR [--overwrite] [--json]',
  description: `Writes base + scale * sum_p factor_p * delta|partition p as a checkpoint in the
base's layout and dtype (shards, index, config and tokenizer files copied).
This is the model a party evaluates during the DPA search.

With --patch, applies a merged patch (dppa pull --patch) instead: copies the base
and overwrites the patch's positions with its values (the server's merge, bit for bit).`,
  flags: {
    base: text('DIR', 'base checkpoint the delta was made against', { required: true, group: REQUIRED, path: 'input' }),
    delta: text('FILE', 'the .dppa file (or --patch)', { group: REQUIRED, path: 'input' }),
    patch: text('FILE', 'a merged patch instead of --delta', { group: REQUIRED, path: 'input' }),
    out: text('DIR', 'output folder (appears only when complete)', { required: true, group: REQUIRED, path: 'output' }),
    factors: numbers(
      'F1,F2,..',
      'one amplification factor per partition, partition 1 first (default all 1)',
      {},
      { group: OPTIONS },
    ),
    scale: number('C', 'weight of the whole delta (default 1)', {}, { group: OPTIONS }),
    'outside-by-max': toggle('scale outside tensors by the largest factor (the released code) instead of 1', {
      group: OPTIONS,
    }),
    overwrite: toggle('replace --out if it exists', { group: OPTIONS }),
    json: toggle('print the result as JSON', { group: OPTIONS }),
  },
  after: `Exit codes: 0 ok, 2 bad command line (or --out exists), 3 missing or bad delta or patch, or one made against
another base (nothing is written then).`,
  action: (v) => {
    if (v.patch !== undefined) {
      if (v.delta !== undefined || v.factors !== undefined || v.scale !== undefined || v['outside-by-max']) {
        throw new UsageError(
          '--patch: give no --delta, --factors, --scale or --outside-by-max (a merged patch holds the merged values)',
        );
      }
      const patch = v.patch;
      return cancellable(async (signal, progress) => {
        const report = await applyPatch({
          base: v.base,
          patch,
          out: v.out,
          overwrite: v.overwrite,
          signal,
          onProgress: (p) => progress.update('apply', p.tensorsDone, p.tensorsTotal, p.tensor, 'count'),
        });
        progress.done();
        if (v.json) out(JSON.stringify(report));
        else
          out(
            `wrote ${report.out}: ${report.tensorsPatched} tensors patched (${report.positions} positions), ${report.tensorsCopied} copied`,
          );
        return EXIT.ok;
      });
    }
    if (v.delta === undefined) throw new UsageError('--delta (or --patch) is required');
    const delta = v.delta;
    return cancellable(async (signal, progress) => {
      const report = await applyDelta({
        base: v.base,
        delta,
        out: v.out,
        ...defined({ factors: v.factors, scale: v.scale }),
        outsideByMax: v['outside-by-max'],
        overwrite: v.overwrite,
        signal,
        onProgress: (p) => progress.update('apply', p.tensorsDone, p.tensorsTotal, p.tensor, 'count'),
      });
      progress.done();
      if (v.json) out(JSON.stringify(report));
      else
        out(
          `wrote ${report.out}: ${report.tensorsChanged} tensors changed, ${report.tensorsCopied} copied, factors ${report.factors.join(', ')}, scale ${report.scale}`,
        );
      return EXIT.ok;
    });
  },
});
