import { defined, num, numList, parse, required } from '../args.js';
import { cancellable, out, type Command } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { applyDelta } from '../../apply.js';
import { applyPatch } from '../../../proto/patch/index.js';

const help = `Usage: dppa apply --base DIR --delta FILE.dppa --out DIR [options]
       dppa apply --base DIR --patch FILE.dppa --out DIR [--overwrite] [--json]

Writes base + scale * sum_p factor_p * delta|partition p as a checkpoint in the
base's layout and dtype (shards, index, config and tokenizer files copied).
This is the model a party evaluates during the DPA search.

  --base DIR          base checkpoint the delta was made against
  --delta FILE        the .dppa file
  --patch FILE        a merged patch (dppa pull --patch) instead: copies the base and overwrites
                      the patch's positions with its values (the server's merge, bit for bit)
  --out DIR           output folder (appears only when complete)
  --factors F1,F2,..  one amplification factor per partition, partition 1 first (default all 1)
  --scale C           weight of the whole delta (default 1)
  --outside-by-max    scale outside tensors by the largest factor (the released code) instead of 1
  --overwrite         replace --out if it exists
  --json              print the result as JSON
  -h, --help          this text

Exit codes: 0 ok, 2 bad command line, 3 bad delta or patch, or one made against another base
(nothing is written then).
`;

export const applyCommand: Command = {
  name: 'apply',
  summary: 'write base + (amplified) pruned delta as a checkpoint',
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      base: { type: 'string' },
      delta: { type: 'string' },
      patch: { type: 'string' },
      out: { type: 'string' },
      factors: { type: 'string' },
      scale: { type: 'string' },
      'outside-by-max': { type: 'boolean' },
      overwrite: { type: 'boolean' },
      json: { type: 'boolean' },
    });
    if (v.patch !== undefined) {
      if (v.delta !== undefined || v.factors !== undefined || v.scale !== undefined || v['outside-by-max'] === true) throw new UsageError('--patch: give no --delta, --factors, --scale or --outside-by-max (a merged patch holds the merged values)');
      const patch = v.patch;
      return cancellable(async (signal, progress) => {
        const report = await applyPatch({
          base: required(v.base, 'base'),
          patch,
          out: required(v.out, 'out'),
          overwrite: v.overwrite,
          signal,
          onProgress: (p) => progress.update('apply', p.tensorsDone, p.tensorsTotal, p.tensor, 'count'),
        });
        progress.done();
        if (v.json === true) out(JSON.stringify(report));
        else out(`wrote ${report.out}: ${report.tensorsPatched} tensors patched (${report.positions} positions), ${report.tensorsCopied} copied`);
        return EXIT.ok;
      });
    }
    return cancellable(async (signal, progress) => {
      const report = await applyDelta({
        base: required(v.base, 'base'),
        delta: required(v.delta, 'delta'),
        out: required(v.out, 'out'),
        ...defined({
          factors: numList(v.factors, 'factors'),
          scale: num(v.scale, 'scale'),
          outsideByMax: v['outside-by-max'],
          overwrite: v.overwrite,
        }),
        signal,
        onProgress: (p) => progress.update('apply', p.tensorsDone, p.tensorsTotal, p.tensor, 'count'),
      });
      progress.done();
      if (v.json === true) out(JSON.stringify(report));
      else out(`wrote ${report.out}: ${report.tensorsChanged} tensors changed, ${report.tensorsCopied} copied, factors ${report.factors.join(', ')}, scale ${report.scale}`);
      return EXIT.ok;
    });
  },
};
