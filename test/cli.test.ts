import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Checkpoint } from '../proto/safetensors/index.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { CHILD_LIMITS } from './fixtures/child-limits.js';

const main = new URL('../client/cli/main.ts', import.meta.url).pathname;

/** Runs the CLI as a separate process, as a user would. */
function dppa(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', main, ...args], CHILD_LIMITS, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
    });
  });
}

let dir: string;
let base: string;
let ft: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cli-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 4, extraVocab: 2 });
  base = fam.base;
  ft = fam.finetuned[0]!;
});
after(() => rm(dir, { recursive: true, force: true }));

describe('dppa CLI', () => {
  it('prints help for the program and every command', async () => {
    const top = await dppa('--help');
    assert.equal(top.code, 0);
    for (const cmd of ['prune', 'apply', 'inspect']) {
      assert.match(top.stdout, new RegExp(`\\b${cmd}\\b`));
      const r = await dppa(cmd, '--help');
      assert.equal(r.code, 0);
      assert.match(r.stdout, new RegExp(`Usage: dppa ${cmd}`));
    }
  });

  it('exits 2 with the flag named for a bad command line', async () => {
    const r = await dppa('prune', '--base', base, '--finetuned', ft, '--out', join(dir, 'a.dppa'));
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--rate is required/);
    const r2 = await dppa('prune', '--base', base, '--finetuned', ft, '--out', join(dir, 'a.dppa'), '--rate', '1.5');
    assert.equal(r2.code, 2);
    assert.match(r2.stderr, /--rate: expected a number ≥ 0 < 1, got "1.5"/);
    const r3 = await dppa('prune', '--bogus');
    assert.equal(r3.code, 2);
    assert.equal((await dppa('frobnicate')).code, 2);
  });

  it('exits 3 and lists the mismatched tensors; truncate says what it did', async () => {
    const out = join(dir, 'v.dppa');
    const r = await dppa('prune', '--base', base, '--finetuned', ft, '--rate', '0.9', '--out', out);
    assert.equal(r.code, 3);
    assert.match(r.stderr, /model\.embed_tokens\.weight: base \[40, 32\], fine-tuned \[42, 32\]/);
    const ok = await dppa(
      'prune',
      '--base',
      base,
      '--finetuned',
      ft,
      '--rate',
      '0.8',
      '--out',
      out,
      '--vocab-mismatch',
      'truncate',
      '--report',
      join(dir, 'r.json'),
    );
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stderr, /lm_head\.weight: fine-tuned tensor has extra rows; compared on the base's rows only/);
    const report = JSON.parse(await readFile(join(dir, 'r.json'), 'utf8')) as {
      method: string;
      rate: number;
      levels: number[];
      tensors: {
        name: string;
        shape: number[];
        numel: number;
        rate: number;
        kept: number;
        keptPerPartition: number[];
      }[];
    };
    assert.equal(report.method, 'dp');
    assert.deepEqual(report.levels, [0.9, 0.8]);
    const q = report.tensors.find((t) => t.name === 'model.layers.0.self_attn.q_proj.weight')!;
    assert.deepEqual(q.shape, [32, 32]);
    assert.equal(
      q.kept,
      q.keptPerPartition.reduce((a, b) => a + b, 0),
    );
    assert.equal(q.kept, q.numel - Math.floor(q.rate * q.numel + 1e-9));
  });

  it('inspect --json and --plot, then apply', async () => {
    const out = join(dir, 'v.dppa');
    const svg = join(dir, 'rates.svg');
    const r = await dppa('inspect', out, '--json', '--plot', svg);
    assert.equal(r.code, 0, r.stderr);
    const summary = JSON.parse(r.stdout) as { method: string; tensors: { kind: string }[] };
    assert.equal(summary.method, 'dp');
    assert.equal(summary.tensors.filter((t) => t.kind === 'linear').length, TINY.layers * 7);
    const plot = await readFile(svg, 'utf8');
    assert.match(plot, /^<svg/);
    assert.match(plot, /self_attn\.q_proj\.weight/);
    assert.equal((plot.match(/<polyline/g) ?? []).length, 7, 'one line per kind of linear layer');
    const text = await dppa('inspect', out);
    assert.match(text.stdout, /method\s+dp, target rate 0.8, levels 0.9, 0.8/);
    const applied = await dppa(
      'apply',
      '--base',
      base,
      '--delta',
      out,
      '--out',
      join(dir, 'applied'),
      '--factors',
      '1.2,1',
      '--json',
    );
    assert.equal(applied.code, 0, applied.stderr);
    assert.equal((JSON.parse(applied.stdout) as { tensorsChanged: number }).tensorsChanged, 2 + TINY.layers * 9 + 1);
  });

  it('exits 3 naming the file, tensor and position of a non-finite weight, whatever the method', async () => {
    const fam = await writeLlamaFamily(join(dir, 'nonfinite'), { seed: 5 });
    const tensor = 'model.layers.1.self_attn.q_proj.weight';
    // A copy of `from` whose tensor holds the bf16 `bits` at flat position 5.
    const poisoned = async (from: string, name: string, bits: number): Promise<string> => {
      const to = join(dir, 'nonfinite', name);
      await cp(from, to, { recursive: true });
      const ck = await Checkpoint.open(to);
      const { file, dataOffset } = ck.info(tensor);
      await ck.close();
      const fh = await open(file, 'r+');
      const bytes = Buffer.alloc(2);
      bytes.writeUInt16LE(bits);
      await fh.write(bytes, 0, 2, dataOffset + 10);
      await fh.close();
      return to;
    };
    const nanFt = await poisoned(fam.finetuned[0]!, 'ft-nan', 0x7fc0);
    const infBase = await poisoned(fam.base, 'base-inf', 0x7f80);
    for (const method of ['dp', 'magnitude', 'owl', 'dare']) {
      const out = join(dir, `nan-${method}.dppa`);
      const r = await dppa(
        'prune',
        '--base',
        fam.base,
        '--finetuned',
        nanFt,
        '--rate',
        '0.7',
        '--method',
        method,
        '--out',
        out,
      );
      assert.equal(r.code, 3, `${method}: ${r.stderr}`);
      assert.equal(
        r.stderr.trim(),
        `dppa prune: ${join(nanFt, 'model.safetensors')}, tensor "${tensor}": flat position 5: the fine-tuned model holds a non-finite weight (NaN)`,
      );
      await assert.rejects(readFile(out), { code: 'ENOENT' }, 'no output is left');
    }
    const r = await dppa(
      'prune',
      '--base',
      infBase,
      '--finetuned',
      fam.finetuned[0]!,
      '--rate',
      '0.7',
      '--out',
      join(dir, 'inf.dppa'),
    );
    assert.equal(r.code, 3, r.stderr);
    assert.equal(
      r.stderr.trim(),
      `dppa prune: ${join(infBase, 'model.safetensors')}, tensor "${tensor}": flat position 5: the base holds a non-finite weight (Infinity)`,
    );
  });

  it('exits 3 naming the file for a damaged or missing delta', async () => {
    const r = await dppa('inspect', join(dir, 'nope.dppa'));
    assert.equal(r.code, 3);
    assert.match(r.stderr, /nope\.dppa/);
  });
});
