// The base tensor's SHA-256 taken on the way of a multi-chunk read (onRaw, pieces out of order): equal to the
// SHA-256 of readRaw with concurrent readF32 calls into reused arrays; and a read whose first chunk stalls hands
// out fewer than ORDERED_LOOKAHEAD chunks ahead of it (what a sink holding early chunks holds is bounded).
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Checkpoint, decodeToF32, type Dtype, type TensorData, writeCheckpoint } from '../proto/safetensors/index.js';
import { ORDERED_LOOKAHEAD, readChunks } from '../proto/safetensors/read-into.js';
import { OrderedHash } from '../server/merge/ordered-hash.js';

const MIB = 1024 * 1024;
let root: string;
let path: string;
/** Sizes above the 1 MiB chunk (and the 64 KiB direct-read limit), none a multiple of it. */
const SIZES: [string, Dtype, number][] = [
  ['a.weight', 'BF16', 3 * 1024 * 1024 + 17],
  ['b.weight', 'F32', 1024 * 1024 + 5],
  ['c.weight', 'F16', 5 * 512 * 1024 + 3],
];
const TENSORS: TensorData[] = SIZES.map(([name, dtype, numel]) => ({
  name,
  dtype,
  shape: [numel],
  data: new Uint8Array(randomBytes(numel * (dtype === 'F32' ? 4 : 2))),
}));

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dppa-read-ordered-'));
  path = join(root, 'model');
  await writeCheckpoint(path, TENSORS, {});
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('onRaw on multi-chunk reads', () => {
  it('hashes each tensor as readRaw’s bytes, for concurrent readF32 calls into reused arrays', async () => {
    const ckpt = await Checkpoint.open(path);
    try {
      for (let round = 0; round < 3; round++) {
        const into = TENSORS.map((t) => new Float32Array(t.shape[0]!));
        const hashes = TENSORS.map((t) => new OrderedHash(t.data.byteLength));
        const out = await Promise.all(
          TENSORS.map((t, i) =>
            ckpt.readF32(t.name, { into: into[i]!, onRaw: (chunk, at) => hashes[i]!.add(chunk, at) }),
          ),
        );
        for (const [i, t] of TENSORS.entries()) {
          const raw = await ckpt.readRaw(t.name);
          const expected = createHash('sha256').update(raw).digest('hex');
          assert.equal(Buffer.from(hashes[i]!.digest()).toString('hex'), expected, t.name);
          const f32 = new Float32Array(t.shape[0]!);
          decodeToF32(t.data, t.dtype, f32);
          assert.ok(Buffer.from(out[i]!.buffer).equals(Buffer.from(f32.buffer)), `${t.name} values`);
        }
      }
    } finally {
      await ckpt.close();
    }
  });

  it('with a lookahead, never hands a chunk that many chunks past the first not yet handed, its first chunk stalled', async () => {
    const t = TENSORS[2]!; // 5 MiB: six chunks
    const ckpt = await Checkpoint.open(path);
    const { dataOffset } = ckpt.info(t.name);
    await ckpt.close();
    const [file] = await readdir(path);
    const fh = await open(join(path, file!), 'r');
    try {
      // The range's first chunk is read only after a while (or once every other chunk is in): the others may run ahead.
      let stalled = false;
      let othersIn = (): void => undefined;
      const slow = {
        read: async (buffer: Uint8Array, offset: number, length: number, position: number) => {
          if (position === dataOffset && !stalled) {
            stalled = true;
            await new Promise<void>((resolve) => {
              const timer = setTimeout(resolve, 500);
              othersIn = () => {
                clearTimeout(timer);
                resolve();
              };
            });
          }
          return fh.read(buffer, offset, length, position);
        },
      } as unknown as typeof fh;
      const seen: number[] = [];
      let maxAhead = 0;
      const got = new Uint8Array(t.data.byteLength);
      await readChunks(
        slow,
        dataOffset,
        t.data.byteLength,
        { file: path, tensor: t.name },
        undefined,
        (chunk, at) => {
          got.set(chunk, at);
          seen.push(at / MIB);
          if (seen.length === Math.ceil(t.data.byteLength / MIB) - 1) othersIn();
          let first = 0;
          while (seen.includes(first)) first++;
          // Chunks handed ahead of the first missing one, this one included.
          maxAhead = Math.max(maxAhead, seen.filter((k) => k > first).length);
        },
        ORDERED_LOOKAHEAD,
      );
      assert.ok(Buffer.from(got).equals(Buffer.from(t.data)));
      assert.ok(maxAhead <= ORDERED_LOOKAHEAD - 1, `${maxAhead} chunks held early`);
    } finally {
      await fh.close();
    }
  });
});
