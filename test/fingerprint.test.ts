import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { baseFingerprint } from '../proto/fingerprint.js';
import { Checkpoint, type TensorData, writeCheckpoint } from '../proto/safetensors/index.js';

let root: string;
let counter = 0;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dppa-fingerprint-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Deterministic, non-repeating bytes (so every sampled block differs). */
function bytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

// big: 600 KiB, sampled; small: 1 KiB, hashed whole; edge: exactly 64 KiB, hashed whole.
const BIG = 300 * 1024 * 2;
function base(): TensorData[] {
  return [
    { name: 'model.layers.0.mlp.weight', dtype: 'BF16', shape: [300, 1024], data: bytes(BIG, 1) },
    { name: 'model.norm.weight', dtype: 'F32', shape: [256], data: bytes(1024, 2) },
    { name: 'model.embed.weight', dtype: 'F16', shape: [32, 1024], data: bytes(65536, 3) },
  ];
}

async function fingerprintOf(
  tensors: TensorData[],
  opts: { shardBytes?: number; metadata?: Record<string, string> } = {},
): Promise<string> {
  const dir = join(root, `ckpt-${counter++}`);
  await writeCheckpoint(dir, tensors, opts);
  const c = await Checkpoint.open(dir);
  try {
    return await baseFingerprint(c);
  } finally {
    await c.close();
  }
}

function withByteFlipped(tensors: TensorData[], name: string, at: number): TensorData[] {
  return tensors.map((t) => {
    if (t.name !== name) return t;
    const data = t.data.slice();
    data[at] = data[at]! ^ 0x01;
    return { ...t, data };
  });
}

void describe('baseFingerprint', () => {
  void it('has the documented form and matches the documented scheme', async () => {
    // More tensors than the read-ahead window, so ordering across it is checked.
    const extra = Array.from({ length: 20 }, (_, i): TensorData => ({
      name: `extra.${i}`,
      dtype: 'F32',
      shape: [i + 1],
      data: bytes(4 * (i + 1), 10 + i),
    }));
    const ts = [...base(), ...extra];
    const fp = await fingerprintOf(ts);
    assert.match(fp, /^fp1:sha256:[0-9a-f]{64}$/);
    // Recompute from the TSDoc description, independently of the implementation.
    const h = createHash('sha256').update('fp1\n');
    for (const t of [...ts].sort((a, b) => (a.name < b.name ? -1 : 1))) {
      h.update(`${JSON.stringify([t.name, t.dtype, t.shape])}\n`);
      if (t.data.length <= 65536) {
        h.update(t.data);
      } else {
        for (let k = 0; k < 16; k++) {
          const start = Math.floor((k * (t.data.length - 4096)) / 15);
          h.update(t.data.subarray(start, start + 4096));
        }
      }
    }
    assert.equal(fp, `fp1:sha256:${h.digest('hex')}`);
  });

  void it('is the same for sharded and unsharded copies, whatever the order and metadata', async () => {
    const single = await fingerprintOf(base());
    const sharded = await fingerprintOf([...base()].reverse(), { shardBytes: 70_000, metadata: { format: 'pt' } });
    assert.equal(sharded, single);
  });

  void it('changes when a sampled byte changes', async () => {
    const original = await fingerprintOf(base());
    const name = 'model.layers.0.mlp.weight';
    const sampledInMiddle = Math.floor((7 * (BIG - 4096)) / 15) + 100;
    for (const at of [0, BIG - 1, sampledInMiddle]) {
      assert.notEqual(await fingerprintOf(withByteFlipped(base(), name, at)), original, `byte ${at}`);
    }
    assert.notEqual(await fingerprintOf(withByteFlipped(base(), 'model.norm.weight', 517)), original);
    assert.notEqual(await fingerprintOf(withByteFlipped(base(), 'model.embed.weight', 40_000)), original);
  });

  void it('does not see a change confined to unsampled bytes (the documented limit)', async () => {
    const original = await fingerprintOf(base());
    const between = Math.floor((1 * (BIG - 4096)) / 15) + 4096 + 10; // after block 1, before block 2
    assert.equal(await fingerprintOf(withByteFlipped(base(), 'model.layers.0.mlp.weight', between)), original);
  });

  void it('changes with a name, shape or dtype change even when the bytes are equal', async () => {
    const original = await fingerprintOf(base());
    const renamed = base().map((t) => (t.name === 'model.norm.weight' ? { ...t, name: 'model.final_norm.weight' } : t));
    const reshaped = base().map((t) => (t.name === 'model.norm.weight' ? { ...t, shape: [16, 16] } : t));
    const retyped = base().map((t): TensorData => (t.name === 'model.embed.weight' ? { ...t, dtype: 'BF16' } : t));
    const variants = [await fingerprintOf(renamed), await fingerprintOf(reshaped), await fingerprintOf(retyped)];
    for (const v of variants) assert.notEqual(v, original);
    assert.equal(new Set(variants).size, 3);
  });

  void it('honours an aborted signal', async () => {
    const dir = join(root, `ckpt-${counter++}`);
    await writeCheckpoint(dir, base());
    const c = await Checkpoint.open(dir);
    try {
      await assert.rejects(baseFingerprint(c, { signal: AbortSignal.abort() }), { name: 'AbortError' });
    } finally {
      await c.close();
    }
  });
});
