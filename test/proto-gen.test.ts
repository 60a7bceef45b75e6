// The generated code under proto/gen is committed; this checks that it is what
// the .proto files generate today, so nobody edits it by hand or forgets to regenerate.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, it } from 'node:test';
import { promisify } from 'node:util';

const root = new URL('..', import.meta.url).pathname;
const bin = join(root, 'node_modules', '.bin');

async function files(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) out.push(relative(dir, join(e.parentPath, e.name)));
  }
  return out.sort();
}

const tmp = await mkdtemp(join(tmpdir(), 'dppa-gen-'));
after(() => rm(tmp, { recursive: true, force: true }));

it('proto/gen matches a fresh buf generate', async () => {
  await promisify(execFile)(join(bin, 'buf'), ['generate', '-o', tmp], {
    cwd: join(root, 'proto'),
    env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}` },
  });
  const fresh = join(tmp, 'gen');
  const committed = join(root, 'proto', 'gen');
  const names = await files(fresh);
  assert.deepEqual(await files(committed), names, 'the same files');
  assert.ok(names.length >= 6);
  for (const name of names) {
    const [a, b] = await Promise.all([readFile(join(fresh, name), 'utf8'), readFile(join(committed, name), 'utf8')]);
    assert.ok(a === b, `${name} differs from what buf generate produces: run npm run gen`);
  }
});
