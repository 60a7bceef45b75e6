/**
 * docs/examples/python/party.py, a party written in Python with stubs generated
 * from proto/ by grpc_tools, against a real server: it creates a job, uploads a
 * `.dppa` file made by `dppa prune`, watches the job and downloads the merged
 * checkpoint, which must be exactly base + delta. Skipped (saying so) where no
 * Python has grpcio and grpc_tools (Debian: python3-grpcio, python3-grpc-tools;
 * .ci/run installs them).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { runChild, runTsx } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const root = new URL('..', import.meta.url).pathname;

/** The first Python that imports grpc and grpc_tools (a pyenv `python3` first on PATH may lack them; Debian's is /usr/bin/python3). */
function findPython(): string | undefined {
  for (const python of ['python3', '/usr/bin/python3']) {
    try {
      execFileSync(python, ['-c', 'import grpc, grpc_tools'], { stdio: 'ignore' });
      return python;
    } catch {
      // not this one
    }
  }
  return undefined;
}

const python = findPython();

describe(
  'the Python party of docs/examples/python',
  {
    skip:
      python === undefined
        ? 'no python3 with grpcio and grpc_tools (apt-get install python3-grpcio python3-grpc-tools)'
        : false,
  },
  () => {
    let dir: string;
    let h: Harness;
    before(async () => {
      dir = await mkdtemp(join(tmpdir(), 'dppa-python-'));
      h = await startHarness(join(dir, 'server-data'));
    });
    after(async () => {
      await h?.close();
      await rm(dir, { recursive: true, force: true });
    });

    it('generates its stubs from proto/, pushes a .dppa file made by the CLI and downloads the merge', async () => {
      const gen = join(dir, 'gen');
      await mkdir(gen);
      const protoFiles = (await readdir(join(root, 'proto/dppa/v1')))
        .filter((f) => f.endsWith('.proto'))
        .map((f) => join('proto/dppa/v1', f));
      const protoc = await runChild(
        python!,
        ['-m', 'grpc_tools.protoc', '-I', 'proto', `--python_out=${gen}`, `--grpc_python_out=${gen}`, ...protoFiles],
        { cwd: root },
      );
      assert.equal(protoc.code, 0, protoc.stderr);

      const family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 5 });
      const delta = join(dir, 'math.dppa');
      const prune = await runTsx(join(root, 'client/cli/main.ts'), [
        'prune',
        '--base',
        family.base,
        '--finetuned',
        family.finetuned[0]!,
        '--rate',
        '0.8',
        '--out',
        delta,
      ]);
      assert.equal(prune.code, 0, prune.stderr);

      const out = join(dir, 'merged');
      const run = await runChild(
        python!,
        [
          join(root, 'docs/examples/python/party.py'),
          '--server',
          h.address,
          '--base-path',
          family.base,
          '--party',
          'math',
          '--delta',
          delta,
          '--out',
          out,
        ],
        {
          env: { ...process.env, PYTHONPATH: gen, DPPA_ADMIN_TOKEN: ADMIN },
        },
      );
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, /^job \S+ created$/m);
      assert.match(run.stdout, /^math: the server holds (\d+)\/\1 tensors, complete=True$/m);
      assert.match(run.stdout, /^state -> JOB_STATE_MERGED$/m);
      // DPA off: every partition of the party's delta counts once.
      await assertMerged(family.base, out, [{ delta, weight: 1, factors: [1, 1] }]);
    });
  },
);
