/**
 * The runnable examples of docs/examples/ run as a reader would run them, each
 * against what it needs (files it generates, a real server), with their output
 * in a temporary folder: federated-demo.ts (`npm run demo -- --out DIR`, the
 * whole job; about 25 s idle, 40 s on a loaded machine; and with `--privacy
 * secure`, its parties scoring candidates with family-eval.ts, one process per
 * candidate: 75-110 s under load 9-16), repro.ts in its
 * `--quick` setting (rates 80% and 90%, DARE seed 0: the same code as
 * `npm run repro` in about 20-30 s instead of 3-5 minutes), prune-demo.ts and
 * sdk-push.ts. The others run elsewhere: eval-harness.ts in dpa-cli.test.ts,
 * nats-wait-merged.ts in nats-events.test.ts, family-lab.ts (a module) in
 * family-lab.test.ts; the Python party in python-party.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState } from '../client/index.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { runTsx } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { memberDir, mergeWeights, readSparseDelta, readWeights } from '../docs/examples/family-lab.js';

const example = (name: string): string => new URL(`../docs/examples/${name}`, import.meta.url).pathname;

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-examples-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('docs/examples', () => {
  it('federated-demo.ts runs the job, writes results.json and prints the Domain-Ratio table', async () => {
    const out = join(dir, 'federated-demo');
    const run = await runTsx(example('federated-demo.ts'), ['--out', out], { timeoutMs: 600_000 });
    assert.equal(run.code, 0, run.stderr);
    const results = await demoResults(out, run.stdout, ['DPPA', 'DPPA upload']);
    assert.deepEqual(Object.keys(results).sort(), ['domainRatio', 'rate', 'uploadBytes']);
  });

  it('federated-demo.ts --privacy secure: each party searches its own factors, the server merges the masked sum', async () => {
    const out = join(dir, 'federated-demo-secure');
    const run = await runTsx(example('federated-demo.ts'), ['--out', out, '--privacy', 'secure'], {
      timeoutMs: 600_000,
    });
    assert.equal(run.code, 0, run.stderr);
    const results = await demoResults(out, run.stdout, ['DPPA \\(secure\\)', 'DPPA upload \\(secure\\)']);
    assert.deepEqual(Object.keys(results).sort(), ['domainRatio', 'privacy', 'rate', 'uploadBytes']);
    assert.equal(results.privacy, 'secure');
    // Each party scored its own candidates (the dense reference first) and chose its factors.
    const chosen = /^ +DPPA factors chosen on validation: (.*)$/m.exec(run.stdout);
    assert.ok(chosen !== null, run.stdout);
    const factors = new Map(
      [...chosen[1]!.matchAll(/(\w+) \[([\d., ]+)\]/g)].map((m) => [m[1]!, m[2]!.split(', ').map(Number)]),
    );
    assert.deepEqual([...factors.keys()].sort(), [...DOMAINS].sort());
    for (const d of DOMAINS) {
      assert.match(
        run.stdout,
        new RegExp(
          `^ +${d} +#1 +dense fine-tune \\(reference\\) +Domain-Ratio 100\\.00 \\(scored by the party\\)$`,
          'm',
        ),
      );
      const mine = factors.get(d)!.join(', ');
      const choices = [
        ...run.stdout.matchAll(
          new RegExp(
            `^ +${d} +chose \\[${escapeRegExp(mine)}\\] \\(validation Domain-Ratio ([\\d.]+)\\), applied before masking$`,
            'gm',
          ),
        ),
      ];
      assert.equal(choices.length, 1, `${d}: one choice line for [${mine}]\n${run.stdout}`);
      // The local search, checked on what the party printed: the chosen factors are among its candidates and have
      // the best of their Domain-Ratios (ties allowed), the one its choice line gives.
      const candidates = [
        ...run.stdout.matchAll(
          new RegExp(
            `^ +${d} +#\\d+ +factors \\[([\\d., ]+)\\] +Domain-Ratio ([\\d.]+) \\(scored by the party\\)$`,
            'gm',
          ),
        ),
      ].map((m) => ({ factors: m[1]!, ratio: Number(m[2]) }));
      assert.ok(candidates.length > 0, `${d}: no candidate printed`);
      const best = Math.max(...candidates.map((c) => c.ratio));
      const chosenRatio = candidates.find((c) => c.factors === mine)?.ratio;
      assert.equal(chosenRatio, best, `${d} chose [${mine}]: ${JSON.stringify(candidates)}`);
      assert.equal(Number(choices[0]![1]), best, d);
    }
    assert.match(run.stdout, /^ +phase masked_input closed: 3 parties, 0 value\(s\) clipped /m);
    assert.match(run.stdout, /^ +phase unmask +closed: 3 parties /m);
    // The merged checkpoint is base + Σ f_p·Δ_p of the parties' own deltas with the factors they chose, summed here
    // in fp32 and rounded to BF16 (the plain merge of the same scaled deltas): bf16-identical in ≥ 99.99% of the
    // weights (the secure sum is within the fixed-point step, 2^-27 at clip bound 4, of the plain one).
    const base = await readWeights(memberDir('base'));
    const deltas = await Promise.all(DOMAINS.map((d) => readSparseDelta(join(out, `${d}-dp.dppa`), base)));
    const plain = mergeWeights(
      base,
      deltas.map((delta, i) => ({ delta, factors: factors.get(DOMAINS[i]!)! })),
    );
    const merged = await readWeights(join(out, 'merged'));
    let same = 0;
    let total = 0;
    let moved = 0;
    for (const [name, want] of plain) {
      const got = merged.get(name)!;
      const b = base.get(name)!;
      for (let i = 0; i < want.length; i++) {
        total++;
        if (got[i] === want[i]) same++;
        if (got[i] !== b[i]) moved++;
      }
    }
    assert.ok(same / total >= 0.9999, `${same} of ${total} weights identical`);
    assert.ok(moved > total / 20, `only ${moved} of ${total} weights differ from the base`);
    // Each party uploads 4 bytes per position of U, the union of the three supports (computed here), besides its
    // support and the protocol's keys and shares.
    let union = 0;
    for (const name of base.keys()) {
      const positions = new Set<number>();
      for (const delta of deltas)
        for (const e of delta.tensors.get(name) ?? []) for (const p of e.positions) positions.add(p);
      union += positions.size;
    }
    assert.match(run.stdout, new RegExp(`\\|U\\| = ${union} positions`));
    assert.ok(results.uploadBytes.dppa! > 3 * 4 * union, `${results.uploadBytes.dppa} bytes, |U| = ${union}`);
  });

  it('repro.ts --quick writes the tables, the rate plot and the agrees / disagrees section', async () => {
    const md = join(dir, 'repro', 'results.md');
    const svg = join(dir, 'repro', 'results-rate.svg');
    await mkdir(join(dir, 'repro'));
    const run = await runTsx(example('repro.ts'), ['--quick', '--out', md, '--svg', svg], { timeoutMs: 600_000 });
    assert.equal(run.code, 0, run.stderr);
    const text = await readFile(md, 'utf8');
    assert.match(text, /Quick setting \(`--quick`\)/);
    for (const h of [1, 2, 3, 4, 5, 6]) assert.match(text, new RegExp(`^## Table ${h}: `, 'm'), `Table ${h}`);
    assert.match(text, /^## Factors chosen by the DPA searches$/m);
    // Table 1: one table per domain, with the quick setting's two rates only.
    for (const d of ['Math', 'Fin', 'Law']) {
      const table = new RegExp(`^\\*\\*${d}-Dense\\*\\*\\n\\n((?:\\|.*\\n)+)`, 'm').exec(text);
      assert.ok(table !== null, d);
      const rates = table[1]!
        .split('\n')
        .slice(2, -1)
        .map((row) => row.split('|')[1]!.trim());
      assert.deepEqual(rates, ['80%', '90%'], d);
    }
    const section = text.slice(text.indexOf('## Where this agrees and disagrees with the paper'));
    assert.ok(section.startsWith('## Where'), 'no agrees / disagrees section');
    assert.match(section, /^- \*\*Agrees: /m);
    assert.match(section, /^- \*\*Disagrees: /m);
    assert.match(await readFile(svg, 'utf8'), /^<svg [^]*<\/svg>\n$/);

    // Table 4's Min and Max are the extremes of F − B over every weight, computed here from the checkpoints.
    const family = (m: string): string => new URL(`fixtures/family/${m}`, import.meta.url).pathname;
    const base = await Checkpoint.open(family('base'));
    try {
      for (const [label, member] of [
        ['Math', 'math'],
        ['Fin', 'finance'],
        ['Law', 'law'],
      ] as const) {
        const ft = await Checkpoint.open(family(member));
        let min = Infinity;
        let max = -Infinity;
        try {
          for (const t of base.tensors()) {
            const [b, f] = await Promise.all([base.readF32(t.name), ft.readF32(t.name)]);
            for (let i = 0; i < b.length; i++) {
              const x = Math.fround(f[i]! - b[i]!);
              if (x < min) min = x;
              if (x > max) max = x;
            }
          }
        } finally {
          await ft.close();
        }
        const row = new RegExp(`^\\| ${label} \\(ours\\) +\\|(.*)\\|$`, 'm').exec(text);
        assert.ok(row !== null, label);
        const cells = row[1]!.split('|').map((c) => c.trim());
        assert.equal(cells[0], min.toPrecision(3), `${label} min`);
        assert.equal(cells.at(-1), max.toPrecision(3), `${label} max`);
      }
    } finally {
      await base.close();
    }
  });

  it('prune-demo.ts prunes with DP and magnitude, plots and applies', async () => {
    const out = join(dir, 'prune-demo');
    const run = await runTsx(example('prune-demo.ts'), [out]);
    assert.equal(run.code, 0, run.stderr);
    // DP spreads the rate over the 28 linear layers by significance; magnitude prunes each at the rate.
    assert.match(run.stdout, /^2\/4 dp {8}at 0\.9: 28 linear layers, rates 0\.\d+\.\.0\.\d+, /m);
    assert.doesNotMatch(run.stdout, /^2\/4 dp {8}at 0\.9: 28 linear layers, rates 0\.9000\.\.0\.9000/m);
    assert.match(run.stdout, /^2\/4 magnitude at 0\.9: 28 linear layers, rates 0\.9000\.\.0\.9000, /m);
    assert.match(run.stdout, /^4\/4 applied: .*base\+dp \(\d+ tensors changed/m);
    for (const f of ['ft1-dp.dppa', 'ft1-magnitude.dppa', 'ft1-dp-rates.svg', 'base+dp/model.safetensors'])
      assert.ok(existsSync(join(out, f)), f);
  });

  describe('sdk-push.ts against a real server', () => {
    let h: Harness;
    let family: { base: string; finetuned: string[] };
    before(async () => {
      family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, finetunes: 2, seed: 3 });
      h = await startHarness(join(dir, 'server-data'));
    });
    after(async () => {
      await h.close();
    });

    it('creates a job, pushes two parties, watches it merge and pulls the merged checkpoint', async () => {
      const out = join(dir, 'sdk-push-merged');
      const run = await runTsx(
        example('sdk-push.ts'),
        [h.address, family.base, family.base, family.finetuned[0]!, family.finetuned[1]!, out],
        {
          env: { ...process.env, DPPA_ADMIN_TOKEN: ADMIN },
        },
      );
      assert.equal(run.code, 0, run.stderr);
      const jobId = /^job (\S+) created$/m.exec(run.stdout)?.[1];
      assert.ok(jobId !== undefined, run.stdout);
      assert.match(run.stdout, /^state → merged$/m);
      assert.match(run.stdout, /^merged checkpoint in .*: .*model\.safetensors/m);

      // The job merged with the example's factors, and what was pulled is a checkpoint of the base's tensors.
      const admin = new DppaClient({ address: h.address, token: ADMIN });
      try {
        const job = await admin.getJob(jobId);
        assert.equal(job.state, JobState.JOB_STATE_MERGED);
        for (const p of job.parties) assert.deepEqual(p.factors, [1.8, 1.2], p.name);
      } finally {
        admin.close();
      }
      const [base, merged] = await Promise.all([Checkpoint.open(family.base), Checkpoint.open(out)]);
      try {
        assert.deepEqual(
          merged
            .tensors()
            .map((t) => t.name)
            .sort(),
          base
            .tensors()
            .map((t) => t.name)
            .sort(),
        );
      } finally {
        await Promise.all([base.close(), merged.close()]);
      }
    });
  });
});

const DOMAINS = ['math', 'finance', 'law'];

/** `text` matched literally in a RegExp. */
function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * results.json of a demo run in `out`, checked against the printed table (its DPPA and upload columns headed
 * `dppa` and `upload`, regular expressions) and the family's size.
 */
/** The demo's results.json. */
interface DemoResults {
  privacy?: string;
  rate: number;
  domainRatio: Record<string, Record<string, number>>;
  uploadBytes: Record<string, number>;
}

async function demoResults(out: string, stdout: string, [dppa, upload]: [string, string]): Promise<DemoResults> {
  const results = JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as DemoResults;
  assert.equal(results.rate, 0.9);
  const merges = ['dense', 'dare', 'magnitude', 'dp', 'dppa'];
  assert.deepEqual(Object.keys(results.domainRatio).sort(), [...merges].sort());
  for (const m of merges) {
    assert.deepEqual(Object.keys(results.domainRatio[m]!).sort(), [...DOMAINS].sort(), m);
    for (const d of DOMAINS) {
      const r = results.domainRatio[m]![d]!;
      assert.ok(typeof r === 'number' && Number.isFinite(r) && r >= 0, `${m}.${d} = ${r}`);
    }
  }
  // A dense delta is one BF16 value per weight of the base, uploaded by each of the three parties.
  const base = await Checkpoint.open(new URL('fixtures/family/base', import.meta.url).pathname);
  let weights = 0;
  try {
    for (const t of base.tensors()) weights += t.numel;
  } finally {
    await base.close();
  }
  assert.deepEqual(Object.keys(results.uploadBytes).sort(), ['dense', 'dppa']);
  assert.equal(results.uploadBytes.dense, 3 * 2 * weights);
  assert.ok(results.uploadBytes.dppa! > 0 && results.uploadBytes.dppa! < results.uploadBytes.dense, stdout);

  // The printed table: one row per domain, its cells the percentages of results.json.
  assert.match(
    stdout,
    new RegExp(`^\\| domain +\\| dense sum \\| +DARE \\| magnitude \\| +DP \\| +${dppa} \\| +${upload} \\|$`, 'm'),
  );
  for (const d of DOMAINS) {
    const row = new RegExp(`^\\| ${d} +\\|(.*)\\|$`, 'm').exec(stdout);
    assert.ok(row !== null, `no table row for ${d}:\n${stdout}`);
    const cells = row[1]!.split('|').map((c) => c.trim());
    assert.equal(cells.length, merges.length + 1, row[0]);
    merges.forEach((m, i) => {
      assert.ok(Math.abs(Number(cells[i]) - 100 * results.domainRatio[m]![d]!) <= 0.006, `${m}.${d}: ${row[0]}`);
    });
    assert.match(cells[merges.length]!, /^[\d.]+ [kM]?B \(\d+\.\d%\)$/, row[0]);
  }
  for (const f of ['merged/model.safetensors', 'math-dp.dppa', 'finance-dp.dppa', 'law-dp.dppa'])
    assert.ok(existsSync(join(out, f)), f);
  return results;
}
