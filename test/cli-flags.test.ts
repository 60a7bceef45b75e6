/**
 * The command line as a user meets it, through the real `bin/dppa.js` and the
 * build it runs (compiled once, into a temporary copy laid out as the
 * package is): --version, "did you mean", every missing flag at once, paths
 * told with their flag, --overwrite, `dppa serve`'s exit code 2 for a bad
 * configuration, and --help of every command listing its flags.
 */
import assert from 'node:assert/strict';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { pruneToFile } from '../client/prune/prune-to-file.js';
import { ADMIN } from './fixtures/grpc-harness.js';
import { runChild, type ChildRun } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const root = new URL('..', import.meta.url).pathname;
const tsc = join(root, 'node_modules/typescript/bin/tsc');

let dir: string;
let bin: string;
let base: string;
let finetuned: string;
let delta: string;

/** Runs the installed-like `dppa` with `args`; DPPA_* variables only as given. */
function dppa(args: string[], env: Record<string, string> = {}): Promise<ChildRun> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DPPA_')));
  return runChild(process.execPath, [bin, ...args], { env: { ...clean, ...env }, cwd: dir });
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-cli-flags-'));
  // The package's layout: bin/, dist/ built from the sources, package.json, the .proto files and the dependencies.
  const pkg = join(dir, 'pkg');
  await mkdir(pkg);
  await cp(join(root, 'bin'), join(pkg, 'bin'), { recursive: true });
  await cp(join(root, 'package.json'), join(pkg, 'package.json'));
  // As package.json's `files`: the .proto files (the server's reflection reads them).
  await cp(join(root, 'proto'), join(pkg, 'proto'), {
    recursive: true,
    filter: (src) => !/\.[a-z]+$/.test(src) || src.endsWith('.proto'),
  });
  await symlink(join(root, 'node_modules'), join(pkg, 'node_modules'));
  const built = await runChild(process.execPath, [
    tsc,
    '-p',
    join(root, 'tsconfig.build.json'),
    '--outDir',
    join(pkg, 'dist'),
    '--sourceMap',
    'false',
    '--declaration',
    'false',
  ]);
  assert.equal(built.code, 0, built.stdout + built.stderr);
  bin = join(pkg, 'bin/dppa.js');
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 21 });
  base = fam.base;
  finetuned = fam.finetuned[0]!;
  delta = join(dir, 'a.dppa');
  await pruneToFile({ base, finetuned, rate: 0.9, out: delta, workers: 1 });
});
after(() => rm(dir, { recursive: true, force: true }));

describe('dppa: the command line', () => {
  it('prints the version of package.json', async () => {
    const { version } = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')) as { version: string };
    const r = await dppa(['--version']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `${version}\n`);
  });

  it('suggests the command meant, and the flag meant', async () => {
    const [prune, serve, create, flag, nothing] = await Promise.all([
      dppa(['pruen']),
      dppa(['serv']),
      dppa(['job', 'craete']),
      dppa(['inspect', delta, '--jsn']),
      dppa(['frobnicate']),
    ]);
    for (const r of [prune, serve, create, flag, nothing]) assert.equal(r.code, 2, r.stderr);
    assert.match(prune.stderr, /^dppa: unknown command "pruen" \(did you mean prune\?\)$/m);
    assert.match(serve.stderr, /\(did you mean serve\?\)/);
    assert.match(create.stderr, /unknown command "job craete" \(did you mean job create\?\)/);
    assert.match(flag.stderr, /^dppa inspect: Unknown option '--jsn' \(did you mean --json\?\)$/m);
    assert.doesNotMatch(nothing.stderr, /did you mean/);
  });

  it('reports every missing required flag at once, by its flag name', async () => {
    const r = await dppa(['prune']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^dppa prune: --base, --finetuned, --rate and --out are required$/m);
    const some = await dppa(['apply', '--base', base]);
    assert.equal(some.code, 2);
    assert.match(some.stderr, /^dppa apply: --out is required$/m);
    const neither = await dppa(['apply', '--base', base, '--out', join(dir, 'never')]);
    assert.equal(neither.code, 2);
    assert.match(neither.stderr, /--delta \(or --patch\) is required/);
    const values = await dppa([
      'prune',
      '--base',
      base,
      '--finetuned',
      finetuned,
      '--out',
      join(dir, 'x.dppa'),
      '--rate',
      'most',
      '--levels',
      '0.9,x',
    ]);
    assert.equal(values.code, 2);
    assert.match(values.stderr, /--rate: expected a number ≥ 0 < 1, got "most"/);
    assert.match(values.stderr, /--levels: expected a number, got "x"/);
    const serve = await dppa(['serve', '--grpc-port', '0'], {});
    assert.equal(serve.code, 2);
    assert.doesNotMatch(serve.stderr, /adminToken/);
  });

  it('names the flag of a missing input path (exit 3), and of a folder that cannot be written', async () => {
    const missing = join(dir, 'no-such-delta.dppa');
    const r = await dppa(['apply', '--base', base, '--delta', missing, '--out', join(dir, 'never')]);
    assert.equal(r.code, 3, r.stderr);
    assert.equal(r.stderr, `dppa apply: --delta: ${missing} does not exist\n`);
    const noBase = await dppa([
      'prune',
      '--base',
      join(dir, 'no-base'),
      '--finetuned',
      finetuned,
      '--rate',
      '0.9',
      '--out',
      join(dir, 'y.dppa'),
    ]);
    assert.equal(noBase.code, 3, noBase.stderr);
    assert.match(noBase.stderr, /^dppa prune: --base: .*no-base does not exist$/m);
    const out = join(dir, 'no-such-folder', 'z.dppa');
    const unwritable = await dppa(['prune', '--base', base, '--finetuned', finetuned, '--rate', '0.9', '--out', out]);
    assert.equal(unwritable.code, 2, unwritable.stderr);
    assert.equal(
      unwritable.stderr,
      `dppa prune: --out: cannot write ${out}: no such file or directory\n(see dppa prune --help)\n`,
      'the flag and the path typed, not a temporary file',
    );
  });

  it('refuses an existing --out with exit 2 and an --overwrite hint, writing nothing; --overwrite replaces it', async () => {
    const out = join(dir, 'merged');
    await mkdir(out);
    await writeFile(join(out, 'mine.txt'), 'keep me');
    const before = (await readdir(dir)).sort();
    const r = await dppa(['apply', '--base', base, '--delta', delta, '--out', out]);
    assert.equal(r.code, 2, r.stderr);
    assert.equal(
      r.stderr,
      `dppa apply: --out: ${out} already exists; pass --overwrite to replace it\n(see dppa apply --help)\n`,
    );
    assert.deepEqual(await readdir(out), ['mine.txt']);
    assert.deepEqual((await readdir(dir)).sort(), before, 'no temporary folder left beside it');

    const file = join(dir, 'kept.dppa');
    await writeFile(file, 'not a delta');
    const p = await dppa(['prune', '--base', base, '--finetuned', finetuned, '--rate', '0.9', '--out', file]);
    assert.equal(p.code, 2, p.stderr);
    assert.match(p.stderr, /--out: .*kept\.dppa already exists; pass --overwrite to replace it/);
    assert.equal(await readFile(file, 'utf8'), 'not a delta');

    const ok = await dppa(['apply', '--base', base, '--delta', delta, '--out', out, '--overwrite']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.ok((await readdir(out)).includes('model.safetensors'));
    assert.ok(!(await readdir(out)).includes('mine.txt'));
  });

  it('`dppa serve` exits 2 naming the flag for every kind of bad configuration', async () => {
    const token = { DPPA_ADMIN_TOKEN: ADMIN };
    const file = join(dir, 'a-file');
    await writeFile(file, 'x');
    const busy: Server = createServer();
    await new Promise<void>((res) => busy.listen(0, '127.0.0.1', res));
    const port = String((busy.address() as { port: number }).port);
    try {
      const cases: [string[], Record<string, string>, RegExp][] = [
        [['--grpc-port', 'x'], token, /--grpc-port: expected an integer/],
        [['--bogus'], token, /Unknown option '--bogus'/],
        [
          ['--grpc-port', '0'],
          { DPPA_ADMIN_TOKEN: 'short' },
          /the admin token \(DPPA_ADMIN_TOKEN or --admin-token-file\): must be at least 16 characters/,
        ],
        [['--grpc-port', '0', '--admin-token-file', join(dir, 'no-token')], {}, /--admin-token-file: cannot read/],
        [
          [
            '--grpc-port',
            '0',
            '--metrics-port',
            '0',
            '--tls-cert',
            join(dir, 'no-cert.pem'),
            '--tls-key',
            join(dir, 'no-key.pem'),
          ],
          token,
          /--tls-cert: cannot read/,
        ],
        [
          ['--grpc-port', '0', '--metrics-port', '0', '--tls-cert', file, '--tls-key', file],
          token,
          /--tls-cert: .*a-file is not a PEM certificate/,
        ],
        [
          ['--grpc-port', '0', '--metrics-port', '0', '--data', join(file, 'sub')],
          token,
          /--data: cannot use .*a-file.*: not a directory/,
        ],
        [
          ['--grpc-port', port, '--metrics-port', '0', '--data', join(dir, 'd1')],
          token,
          new RegExp(`--grpc-host/--grpc-port: cannot listen on 127\\.0\\.0\\.1:${port}: EADDRINUSE`),
        ],
        [
          ['--grpc-port', '0', '--metrics-port', port, '--data', join(dir, 'd2')],
          token,
          /--metrics-port: cannot listen: EADDRINUSE/,
        ],
        [['--grpc-port', '0', '--task-ack-wait-ms', '5000'], token, /--task-ack-wait-ms needs --cluster/],
      ];
      const runs = await Promise.all(cases.map(([args, env]) => dppa(['serve', ...args], env)));
      for (const [i, r] of runs.entries()) {
        const what = cases[i]![0].join(' ');
        assert.equal(r.code, 2, `${what}: ${r.stderr}`);
        assert.match(r.stderr, cases[i]![2], what);
        assert.doesNotMatch(
          r.stderr,
          /\b(adminToken|grpcPort|metricsPort|dataDir|taskAckWaitMs)\b|\.tmp-|\n\s+at /,
          what,
        );
      }
    } finally {
      await new Promise((res) => busy.close(res));
    }
  });

  it('--help of every command lists its flags', async () => {
    // From docs/cli.md: a few flags of each command, and the connection flags of those that talk to a server.
    const connection = ['--server HOST:PORT', '--tls-ca FILE', '--retry-for DURATION'];
    const commands: Record<string, string[]> = {
      prune: ['--base DIR', '--finetuned DIR', '--rate R', '--out FILE', '--method M', '--overwrite', '--json'],
      apply: ['--base DIR', '--delta FILE', '--out DIR', '--factors', '--overwrite'],
      inspect: ['FILE', '--json', '--plot FILE', '--overwrite'],
      'job create': [
        '--base DIR',
        '--parties a,b,c',
        '--rate R',
        '--dpa SPEC',
        '--weights',
        '--evaluator',
        '--admin-token-file FILE',
        ...connection,
      ],
      'job status': ['--job ID', '--token T', '--admin-token-file FILE', '--json', ...connection],
      'job list': ['--admin-token-file FILE', '--json', ...connection],
      'job watch': ['--job ID', '--after-seq N', '--json', ...connection],
      'job cancel': ['--job ID', '--reason TEXT', '--json', ...connection],
      'job resume': ['--job ID', '--json', ...connection],
      push: [
        '--job ID',
        '--party P',
        '--base DIR',
        '--finetuned DIR',
        '--delta FILE',
        '--keep-delta FILE',
        '--rate R',
        '--levels',
        '--eval-cmd CMD',
        '--token T',
        ...connection,
      ],
      evaluate: ['--job ID', '--party P', '--eval-cmd CMD', '--eval-retries N', '--work-dir DIR', ...connection],
      pull: ['--job ID', '--out DIR', '--overwrite', ...connection],
      health: ['--service NAME', '--server HOST:PORT', '--tls-ca FILE'],
      serve: [
        '--data DIR',
        '--grpc-host HOST',
        '--grpc-port N',
        '--metrics-port N',
        '--admin-token-file FILE',
        '--tls-cert FILE',
        '--nats URL',
        '--cluster',
        '--task-ack-wait-ms N',
        '--task-attempts N',
      ],
    };
    const names = Object.keys(commands);
    const helps = await Promise.all(names.map((c) => dppa([...c.split(' '), '--help'])));
    for (const [i, r] of helps.entries()) {
      const name = names[i]!;
      assert.equal(r.code, 0, `${name}: ${r.stderr}`);
      assert.match(r.stdout, new RegExp(`^Usage: dppa ${name} `), name);
      for (const f of [...commands[name]!, '-h, --help'])
        assert.match(
          r.stdout,
          new RegExp(`^  ${f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\b`, 'm'),
          `${name} --help lists ${f}`,
        );
      assert.match(r.stdout, /Exit codes: 0 /, name);
    }
    // A probe asks once: `dppa health` has no --retry-for to accept and ignore.
    assert.doesNotMatch(helps[names.indexOf('health')]!.stdout, /--retry-for/);
  });
});
