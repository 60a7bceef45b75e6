/**
 * The package as others get it: `npm pack` of a copy of the sources (its
 * `prepare` builds dist/), installed with `npm ci --offline` into a fresh
 * project; there test/fixtures/consumer/push.ts, which imports the package by
 * name only, is type-checked and run: it starts a server from
 * `dppa-federated/server` and pushes to it with the SDK.
 *
 * Offline: the fresh project's package-lock.json is this repository's, less its
 * dev-only entries, plus the tarball. Its dependencies are then the very
 * packages, at the same places, that the repository's own `npm ci` put in npm's
 * cache, so `npm ci --offline` finds everything there (checked with an empty
 * cache filled by `npm ci` alone). Without a lock file npm would resolve the
 * version ranges afresh and need the registry.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { runChild } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const root = new URL('..', import.meta.url).pathname;
/** What the build needs besides `files`; copied, so that packing does not rewrite this checkout's dist/. */
const SOURCES = [
  'package.json',
  'package-lock.json',
  'tsconfig.json',
  'tsconfig.build.json',
  'README.md',
  'CHANGELOG.md',
  'bin',
  'client',
  'proto',
  'server',
];
/** npm and onnxruntime-node without network: onnxruntime-node's install script would fetch its CUDA binaries. */
const OFFLINE = {
  ...process.env,
  ONNXRUNTIME_NODE_INSTALL: 'skip',
  npm_config_audit: 'false',
  npm_config_fund: 'false',
  npm_config_update_notifier: 'false',
};

interface LockEntry {
  dev?: boolean;
  [field: string]: unknown;
}

interface PackResult {
  filename: string;
  files: { path: string }[];
}

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-package-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('the npm package', () => {
  let packed: PackResult;
  let consumer: string;

  it('npm pack builds dist/ and ships what exports point to, without sources, tests or source maps', async () => {
    const stage = join(dir, 'stage');
    await mkdir(stage);
    await Promise.all(
      SOURCES.map((s) =>
        cp(join(root, s), join(stage, s), { recursive: true, filter: (src) => !src.endsWith('.test.ts') }),
      ),
    );
    await symlink(join(root, 'node_modules'), join(stage, 'node_modules'), 'dir');
    const run = await runChild('npm', ['pack', '--json', '--pack-destination', dir], { cwd: stage, env: OFFLINE });
    assert.equal(run.code, 0, run.stderr);
    // npm prints the `prepare` script's output before the JSON.
    packed = (JSON.parse(run.stdout.slice(run.stdout.indexOf('\n[') + 1)) as PackResult[])[0]!;
    const files = new Set(packed.files.map((f) => f.path));

    const pkg = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')) as {
      exports: Record<string, string | Record<string, string>>;
      types: string;
      bin: Record<string, string>;
    };
    const targets = [
      pkg.types,
      ...Object.values(pkg.bin),
      ...Object.values(pkg.exports).flatMap((e) => (typeof e === 'string' ? [e] : Object.values(e))),
    ];
    for (const t of targets) assert.ok(files.has(t.replace(/^\.\//, '')), `${t} is in the tarball`);
    for (const f of [
      'proto/dppa/v1/jobs.proto',
      'proto/dppa/v1/upload.proto',
      'proto/dppa/v1/sparse.proto',
      'dist/proto/gen/dppa/v1/jobs.js',
      'README.md',
    ])
      assert.ok(files.has(f), f);
    const stray = [...files].filter(
      (f) =>
        f.endsWith('.map') ||
        (f.endsWith('.ts') && !f.endsWith('.d.ts')) ||
        f.startsWith('test/') ||
        f.startsWith('docs/'),
    );
    assert.deepEqual(stray, []);
  });

  it('installs offline into a fresh project, with its dependencies and the dppa command', async () => {
    assert.ok(packed !== undefined, 'packed');
    consumer = join(dir, 'consumer');
    await mkdir(consumer);
    await cp(join(dir, packed.filename), join(consumer, packed.filename));
    const spec = `file:${packed.filename}`;
    const pkg = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')) as Record<string, unknown>;
    const lock = JSON.parse(await readFile(join(root, 'package-lock.json'), 'utf8')) as {
      packages: Record<string, LockEntry>;
    };
    const packages: Record<string, unknown> = {
      '': { name: 'consumer', dependencies: { 'dppa-federated': spec } },
      'node_modules/dppa-federated': {
        version: pkg.version,
        resolved: spec,
        license: pkg.license,
        dependencies: pkg.dependencies,
        bin: pkg.bin,
        engines: pkg.engines,
      },
    };
    for (const [path, entry] of Object.entries(lock.packages))
      if (path !== '' && entry.dev !== true) packages[path] = entry;
    // The repository's `overrides` too, as docs/sdk.md advises a project on Node 20: its lock entries follow them.
    await writeFile(
      join(consumer, 'package.json'),
      JSON.stringify(
        {
          name: 'consumer',
          private: true,
          type: 'module',
          dependencies: { 'dppa-federated': spec },
          overrides: pkg.overrides,
        },
        null,
        2,
      ),
    );
    await writeFile(
      join(consumer, 'package-lock.json'),
      JSON.stringify({ name: 'consumer', lockfileVersion: 3, requires: true, packages }, null, 2),
    );

    const install = await runChild('npm', ['ci', '--offline'], { cwd: consumer, env: OFFLINE });
    assert.equal(install.code, 0, install.stderr);
    const help = await runChild(join(consumer, 'node_modules/.bin/dppa'), ['--help'], { cwd: consumer });
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /^Usage: dppa /m);
    // Only the two documented entries: internals are not importable.
    const deep = await runChild(
      process.execPath,
      ['--input-type=module', '-e', "await import('dppa-federated/dist/client/sdk/client.js')"],
      { cwd: consumer },
    );
    assert.match(deep.stderr, /ERR_PACKAGE_PATH_NOT_EXPORTED/);
  });

  it('a program importing it by name type-checks against its declarations, runs a server and pushes to it', async () => {
    assert.ok(consumer !== undefined, 'installed');
    for (const f of ['push.ts', 'tsconfig.json']) await cp(join(root, 'test/fixtures/consumer', f), join(consumer, f));
    const tsc = await runChild(
      process.execPath,
      [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(consumer, 'tsconfig.json')],
      { cwd: consumer },
    );
    assert.equal(tsc.code, 0, tsc.stdout + tsc.stderr);

    const family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 9 });
    const out = join(dir, 'merged');
    const run = await runChild(
      process.execPath,
      [join(consumer, 'push.js'), family.base, family.finetuned[0]!, join(dir, 'data'), out],
      { cwd: consumer },
    );
    assert.equal(run.code, 0, run.stderr);
    const pushed = /^pushed (\d+) tensors; job merged; pulled (.*)$/m.exec(run.stdout);
    assert.ok(pushed !== null, run.stdout);
    assert.ok(Number(pushed[1]) > 0);
    assert.ok(pushed[2]!.split(',').includes('model.safetensors'));
    assert.ok(existsSync(join(out, 'model.safetensors')));
  });
});
