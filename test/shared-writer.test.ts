// SharedCheckpointWriter: a checkpoint laid out once, written tensor by tensor through separate writers (as separate
// replicas do), in any order and some twice, then committed, equals what CheckpointWriter writes.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FormatError } from '../proto/errors.js';
import { planLayout, SharedCheckpointWriter, writeCheckpoint, type TensorData } from '../proto/safetensors/index.js';

let dir: string;
const tensors: TensorData[] = Array.from({ length: 7 }, (_, i) => ({
  name: `t${i}`,
  dtype: 'BF16' as const,
  shape: [3 + i, 5],
  data: Uint8Array.from({ length: (3 + i) * 5 * 2 }, (_, k) => (k * 7 + i) & 0xff),
}));

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-shared-writer-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function files(folder: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const name of (await readdir(folder)).sort()) out.set(name, await readFile(join(folder, name)));
  return out;
}

describe('SharedCheckpointWriter', () => {
  it('writes the same sharded checkpoint as CheckpointWriter, through several writers, in any order', async () => {
    const layout = await writeCheckpoint(join(dir, 'reference'), tensors, { shardBytes: 200 });
    assert.ok(layout.sharded && layout.files.length > 2);
    const extras = join(dir, 'extras');
    await writeCheckpoint(extras, tensors.slice(0, 1));
    await writeFile(join(extras, 'config.json'), '{}\n');
    const tmp = join(dir, 'out.work');
    const out = join(dir, 'out');
    await SharedCheckpointWriter.layOut(tmp, out, layout, { copyExtraFilesFrom: extras });
    // Laying out again (another replica, a redelivered task) keeps what is there.
    const first = await SharedCheckpointWriter.open(tmp, out, layout);
    await first.writeTensor('t6', tensors[6]!.data);
    await SharedCheckpointWriter.layOut(tmp, out, layout, { copyExtraFilesFrom: extras });
    const second = await SharedCheckpointWriter.open(tmp, out, layout);
    for (const t of [...tensors].reverse()) await (t.name < 't3' ? first : second).writeTensor(t.name, t.data);
    await second.writeTensor('t2', tensors[2]!.data);
    await assert.rejects(first.writeTensor('t1', new Uint8Array(3)), FormatError);
    await assert.rejects(first.writeTensor('nope', new Uint8Array(3)), FormatError);
    await Promise.all([first.close(), second.close()]);
    await SharedCheckpointWriter.commit(tmp, out);
    // Committing again (a repeated commit task) finds it done.
    await SharedCheckpointWriter.commit(tmp, out);
    await assert.rejects(stat(tmp), /ENOENT/);
    const got = await files(out);
    assert.deepEqual(got.get('config.json')?.toString(), '{}\n');
    got.delete('config.json');
    assert.deepEqual(got, await files(join(dir, 'reference')));
    await assert.rejects(SharedCheckpointWriter.open(tmp, out, layout), /does not exist/);
  });

  it('writes an unsharded layout', async () => {
    const layout = planLayout(tensors);
    const tmp = join(dir, 'single.work');
    const out = join(dir, 'single');
    await SharedCheckpointWriter.layOut(tmp, out, layout);
    const w = await SharedCheckpointWriter.open(tmp, out, layout);
    for (const t of tensors) await w.writeTensor(t.name, t.data);
    await w.close();
    await SharedCheckpointWriter.commit(tmp, out);
    await writeCheckpoint(join(dir, 'single-ref'), tensors);
    assert.deepEqual(await files(out), await files(join(dir, 'single-ref')));
  });
});
