// The merged patch end to end: a real server on loopback merges two parties' deltas into a
// sharded bf16 base; the patch pulled (`dppa pull --patch`, `--base`) and applied locally gives
// the dense merge bit for bit; a damaged patch or one for another base is refused with exit 3
// and nothing written; `--output patch` writes no dense checkpoint and `--output dense` no patch.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DppaClient, JobState, MergeOutput, PatchBaseMismatchError, pruneToFile } from '../client/index.js';
import { PATCH_FILE_NAME } from '../proto/patch/index.js';
import { DeltaRecord } from '../proto/gen/dppa/v1/sparse.js';
import { DELTA_FILE_MAGIC } from '../proto/sparse/delta-format.js';
import { readDeltaFile } from '../proto/sparse/index.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { runTsx } from './fixtures/run-child.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const root = new URL('..', import.meta.url).pathname;
const cli = join(root, 'client/cli/main.ts');
const WEIGHTS = { math: 1, law: 0.5 };
const FACTORS = [1.5, 0.75];

let dir: string;
let base: string;
let otherBase: string;
let deltas: string[];
let h: Harness;
let admin: DppaClient;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-merged-patch-'));
  // Sharded, so that the applied output must mirror a multi-file layout and index.
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 31, finetunes: 2, shardBytes: 8000 });
  base = fam.base;
  otherBase = (await writeLlamaFamily(join(dir, 'other'), { shape: TINY, seed: 32, finetunes: 0 })).base;
  deltas = await Promise.all(
    fam.finetuned.map(
      async (ft, i) => (await pruneToFile({ base, finetuned: ft, rate: 0.8, out: join(dir, `d${i}.dppa`) })).file,
    ),
  );
  h = await startHarness(join(dir, 'data'));
  admin = new DppaClient({ address: h.address, token: ADMIN });
});
after(async () => {
  admin.close();
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** A job of the two parties merged with `output`; resolves once MERGED. */
async function mergedJob(output: MergeOutput): Promise<string> {
  const { job, tokens } = await admin.createJob({
    basePath: base,
    parties: ['math', 'law'],
    rate: 0.8,
    dpa: { fixed: { factors: FACTORS, perParty: {} }, scaleOutsideByMax: false },
    merge: { weights: WEIGHTS, signElection: false, partiesMayDownload: false, output },
  });
  for (const [i, party] of ['math', 'law'].entries()) {
    const c = new DppaClient({ address: h.address, token: tokens[party]! });
    try {
      await c.push({ jobId: job.id, party, delta: deltas[i]! });
    } finally {
      c.close();
    }
  }
  for await (const e of admin.watchJob(job.id)) void e;
  const final = await admin.getJob(job.id);
  assert.equal(final.state, JobState.JOB_STATE_MERGED, final.failureReason);
  return job.id;
}

function dppa(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return runTsx(cli, args, { env: { ...process.env, DPPA_ADMIN_TOKEN: ADMIN } });
}

/** Every file of a folder with its bytes. */
async function files(folder: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const name of (await readdir(folder)).sort()) out.set(name, await readFile(join(folder, name)));
  return out;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Entries of `dir` whose names start with `prefix` (an output and its temporary siblings). */
async function siblings(prefix: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.startsWith(prefix));
}

/** The server's file `name` of a job, found in its data folder. */
async function serverFile(jobId: string, name: string): Promise<string | undefined> {
  const data = join(dir, 'data');
  const rel = (await readdir(data, { recursive: true })).find((p) => p.includes(jobId) && p.endsWith(name));
  return rel === undefined ? undefined : join(data, rel);
}

const parties = (): { delta: string; weight: number; factors: number[] }[] => [
  { delta: deltas[0]!, weight: WEIGHTS.math, factors: FACTORS },
  { delta: deltas[1]!, weight: WEIGHTS.law, factors: FACTORS },
];

describe('merged patch', () => {
  let both: string;
  let dense: Map<string, Buffer>;
  let patchFile: string;

  before(async () => {
    both = await mergedJob(MergeOutput.MERGE_OUTPUT_UNSPECIFIED);
    await admin.pull({ jobId: both, out: join(dir, 'dense') });
    dense = await files(join(dir, 'dense'));
    patchFile = join(dir, 'merged.dppa');
  });

  it('pull --patch then apply --patch, and pull --base, give the dense merge bit for bit', async () => {
    const pulled = await dppa('pull', '--server', h.address, '--job', both, '--patch', '--out', patchFile);
    assert.equal(pulled.code, 0, pulled.stderr);
    const applied = await dppa('apply', '--base', base, '--patch', patchFile, '--out', join(dir, 'applied'));
    assert.equal(applied.code, 0, applied.stderr);
    assert.deepEqual(await files(join(dir, 'applied')), dense);
    const viaBase = await dppa(
      'pull',
      '--server',
      h.address,
      '--job',
      both,
      '--base',
      base,
      '--out',
      join(dir, 'via-base'),
      '--json',
    );
    assert.equal(viaBase.code, 0, viaBase.stderr);
    assert.deepEqual(await files(join(dir, 'via-base')), dense);
    assert.deepEqual(await siblings('via-base'), ['via-base'], 'the downloaded patch is removed once applied');
    // Independently of the server: the applied checkpoint is base + Σ c_i Σ_p f_p Δ_ip.
    await assertMerged(base, join(dir, 'via-base'), parties());
    // Only the changed positions travel: smaller than the dense checkpoint's tensors.
    const denseBytes = [...dense.values()].reduce((a, b) => a + b.length, 0);
    assert.ok((await stat(patchFile)).size < denseBytes, 'the patch is smaller than the checkpoint');
  });

  it('refuses a damaged patch with exit 3 and writes nothing', async () => {
    const bytes = await readFile(patchFile);
    // A byte inside the last chunk's values (the last records are that chunk, the tensor end and the end marker).
    let lastChunkValues = '';
    for await (const r of readDeltaFile(patchFile))
      if (r.chunk !== undefined) lastChunkValues = Buffer.from(r.chunk.values).toString('hex');
    const at = bytes.indexOf(Buffer.from(lastChunkValues, 'hex')) + 1;
    assert.ok(at > 0);
    bytes[at] = bytes[at]! ^ 0x40;
    const damaged = join(dir, 'damaged.dppa');
    await writeFile(damaged, bytes);
    const r = await dppa('apply', '--base', base, '--patch', damaged, '--out', join(dir, 'from-damaged'));
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /CRC|checksum/i);
    assert.deepEqual(await siblings('from-damaged'), []);
    // Cut short.
    await writeFile(damaged, bytes.subarray(0, bytes.length - 100));
    const cut = await dppa('apply', '--base', base, '--patch', damaged, '--out', join(dir, 'from-damaged'));
    assert.equal(cut.code, 3, cut.stderr);
    assert.deepEqual(await siblings('from-damaged'), []);
  });

  it('refuses a patch for another base with exit 3 and writes nothing', async () => {
    const r = await dppa(
      'pull',
      '--server',
      h.address,
      '--job',
      both,
      '--base',
      otherBase,
      '--out',
      join(dir, 'wrong-base'),
    );
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /another base/);
    assert.deepEqual(await siblings('wrong-base'), []);
    // Refused before the download: no byte of the patch is fetched, no temporary folder made.
    const progress: number[] = [];
    await assert.rejects(
      admin.pull(
        { jobId: both, out: join(dir, 'wrong-base'), base: otherBase },
        { onProgress: (p) => progress.push(p.bytesDone) },
      ),
      PatchBaseMismatchError,
    );
    assert.deepEqual(progress, []);
    assert.deepEqual(await siblings('wrong-base'), []);
    const local = await dppa('apply', '--base', otherBase, '--patch', patchFile, '--out', join(dir, 'wrong-base'));
    assert.equal(local.code, 3, local.stderr);
    assert.deepEqual(await siblings('wrong-base'), []);
  });

  it('refuses a patch whose base tensor hash differs, naming the tensor, with exit 3 and nothing written', async () => {
    // The fingerprint samples blocks only: the header's SHA-256 of each patched base tensor
    // catches a base that differs elsewhere. Forged here by changing one hash in the header.
    const bytes = await readFile(patchFile);
    const at = DELTA_FILE_MAGIC.length;
    const length = bytes.readUInt32LE(at);
    const header = DeltaRecord.decode(bytes.subarray(at + 4, at + 4 + length)).header!;
    const victim = header.tensors[1]!;
    assert.equal(victim.baseSha256.length, 32);
    victim.baseSha256 = new Uint8Array(victim.baseSha256).map((b) => b ^ 0xff);
    const encoded = DeltaRecord.encode({ header }).finish();
    const prefix = Buffer.alloc(4);
    prefix.writeUInt32LE(encoded.length);
    const forged = join(dir, 'forged.dppa');
    await writeFile(forged, Buffer.concat([bytes.subarray(0, at), prefix, encoded, bytes.subarray(at + 4 + length)]));
    const r = await dppa('apply', '--base', base, '--patch', forged, '--out', join(dir, 'from-forged'));
    assert.equal(r.code, 3, r.stderr);
    assert.match(r.stderr, /another base/);
    assert.ok(r.stderr.includes(victim.name), r.stderr);
    assert.deepEqual(await siblings('from-forged'), []);
  });

  it('a patch the server holds damaged does not verify: refused, nothing written', async () => {
    const job = await mergedJob(MergeOutput.MERGE_OUTPUT_PATCH);
    const onServer = (await serverFile(job, PATCH_FILE_NAME))!;
    const bytes = await readFile(onServer);
    bytes[bytes.length >> 1] = bytes[bytes.length >> 1]! ^ 1;
    await writeFile(onServer, bytes);
    const r = await dppa(
      'pull',
      '--server',
      h.address,
      '--job',
      job,
      '--base',
      base,
      '--out',
      join(dir, 'server-damaged'),
    );
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, /SHA-256/);
    assert.ok(!(await exists(join(dir, 'server-damaged'))));
  });

  it('--output patch writes no dense checkpoint; the patch still gives the dense merge', async () => {
    const job = await mergedJob(MergeOutput.MERGE_OUTPUT_PATCH);
    assert.equal(await serverFile(job, '.safetensors'), undefined, 'no dense file on the server');
    const denseRun = await dppa('pull', '--server', h.address, '--job', job, '--out', join(dir, 'patch-only-dense'));
    assert.equal(denseRun.code, 4, denseRun.stderr);
    assert.match(denseRun.stderr, /no merged files/);
    const r = await dppa('pull', '--server', h.address, '--job', job, '--base', base, '--out', join(dir, 'patch-only'));
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(await files(join(dir, 'patch-only')), dense);
  });

  it('--output dense writes no patch', async () => {
    const job = await mergedJob(MergeOutput.MERGE_OUTPUT_DENSE);
    assert.equal(await serverFile(job, PATCH_FILE_NAME), undefined);
    assert.ok((await serverFile(job, '.safetensors')) !== undefined);
    const r = await dppa('pull', '--server', h.address, '--job', job, '--patch', '--out', join(dir, 'none.dppa'));
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, /no merged patch/);
    assert.ok(!(await exists(join(dir, 'none.dppa'))));
  });
});
