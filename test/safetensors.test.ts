import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, rm, stat, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FormatError, TruncatedError, UnsupportedDtypeError } from '../proto/errors.js';
import {
  Checkpoint,
  CheckpointWriter,
  type CheckpointLayout,
  decodeToF32,
  type Dtype,
  type TensorData,
  writeCheckpoint,
} from '../proto/safetensors/index.js';

let root: string;
let counter = 0;
/** A fresh path under the test's temp dir (not created). */
const fresh = (label: string): string => join(root, `${label}-${counter++}`);

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dppa-safetensors-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

function tensor(name: string, dtype: Dtype, shape: number[]): TensorData {
  const numel = shape.reduce((a, b) => a * b, 1);
  return { name, dtype, shape, data: new Uint8Array(randomBytes(numel * (dtype === 'F32' ? 4 : 2))) };
}

/** Bit-for-bit equality, fast enough for megabytes (assert.deepEqual is not). */
function sameBytes(a: ArrayBufferView, b: ArrayBufferView): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function u32(a: Float32Array): number[] {
  return [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
}

async function withCheckpoint<T>(path: string, fn: (c: Checkpoint) => T | Promise<T>): Promise<T> {
  const c = await Checkpoint.open(path);
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}

/** Encodes a safetensors file by hand: u64 LE length, JSON, data. */
function craft(header: string | Uint8Array | object, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const json =
    header instanceof Uint8Array
      ? header
      : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const out = new Uint8Array(8 + json.length + data.length);
  let n = json.length;
  for (let i = 0; i < 8; i++) {
    out[i] = n % 256;
    n = Math.floor(n / 256);
  }
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

async function craftFile(header: string | Uint8Array | object, data?: Uint8Array): Promise<string> {
  const file = `${fresh('crafted')}.safetensors`;
  await writeFile(file, craft(header, data));
  return file;
}

/** Asserts `p` rejects with exactly `type` and a message naming every string in `mentions`. */
async function rejectsWith(p: Promise<unknown>, type: typeof FormatError, mentions: string[]): Promise<FormatError> {
  let caught: unknown;
  try {
    await p;
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof type, `expected ${type.name}, got ${String(caught)}`);
  assert.equal(caught.name, type.name);
  for (const m of mentions)
    assert.ok(caught.message.includes(m), `message ${JSON.stringify(caught.message)} should mention ${m}`);
  return caught;
}

void describe('round trips', () => {
  const tensors = [
    tensor('model.embed.weight', 'BF16', [16, 8]),
    tensor('model.layers.0.attn.q_proj.weight', 'F16', [8, 8]),
    tensor('model.layers.0.norm.weight', 'F32', [8]),
    tensor('scalar', 'F32', []),
    tensor('empty', 'BF16', [0, 4]),
    tensor('lm_head.weight', 'BF16', [3, 5, 7]),
  ];

  void it('single file: bytes bit-exact, F32 values exact, metadata and order kept', async () => {
    const dir = fresh('single');
    await writeCheckpoint(dir, tensors, { metadata: { format: 'pt', note: 'hello' } });
    assert.deepEqual(await readdir(dir), ['model.safetensors']);
    await withCheckpoint(dir, async (c) => {
      assert.equal(c.path, join(dir, 'model.safetensors'));
      assert.deepEqual(
        c.tensors().map((t) => t.name),
        tensors.map((t) => t.name),
      );
      assert.equal(c.layout.sharded, false);
      assert.deepEqual(
        c.layout.files.map((f) => f.metadata),
        [{ format: 'pt', note: 'hello' }],
      );
      let expectedOffset: number | undefined;
      for (const t of tensors) {
        const info = c.info(t.name);
        assert.equal(info.file, join(dir, 'model.safetensors'));
        assert.equal(info.dtype, t.dtype);
        assert.deepEqual(info.shape, t.shape);
        assert.equal(info.byteLength, t.data.byteLength);
        assert.equal(
          info.numel,
          t.shape.reduce((a, b) => a * b, 1),
        );
        if (expectedOffset !== undefined) assert.equal(info.dataOffset, expectedOffset);
        assert.equal(info.dataOffset % 1, 0);
        expectedOffset = info.dataOffset + info.byteLength;
        assert.deepEqual(await c.readRaw(t.name), t.data);
        assert.deepEqual(u32(await c.readF32(t.name)), u32(decodeToF32(t.data, t.dtype, new Float32Array(info.numel))));
      }
      assert.equal(c.info('scalar').numel, 1);
      assert.equal((await c.readF32('empty')).length, 0);
    });
    // The header is padded so that data starts 8-byte aligned.
    const file = await readFile(join(dir, 'model.safetensors'));
    assert.equal(Number(file.readBigUInt64LE(0)) % 8, 0);
  });

  void it('opens a .safetensors file given directly', async () => {
    const dir = fresh('direct');
    await writeCheckpoint(dir, tensors.slice(0, 2));
    await withCheckpoint(join(dir, 'model.safetensors'), async (c) => {
      assert.deepEqual(await c.readRaw(tensors[1]!.name), tensors[1]!.data);
    });
  });

  void it('sharded into 3 files: index, order, metadata and bytes kept', async () => {
    const dir = fresh('sharded');
    const big = [
      tensor('a.weight', 'BF16', [64, 64]), // 8192 bytes
      tensor('b.weight', 'F32', [32, 64]), // 8192
      tensor('c.weight', 'F16', [64, 64]), // 8192
      tensor('d.bias', 'F32', [64]), // 256
      tensor('e.weight', 'BF16', [16, 16]), // 512: still fits the third shard
    ];
    await writeCheckpoint(dir, big, { shardBytes: 9000, metadata: { format: 'pt' } });
    assert.deepEqual(
      (await readdir(dir)).sort(),
      [
        'model-00001-of-00003.safetensors',
        'model-00002-of-00003.safetensors',
        'model-00003-of-00003.safetensors',
        'model.safetensors.index.json',
      ].sort(),
    );
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as {
      metadata: { total_size: number };
      weight_map: Record<string, string>;
    };
    assert.equal(index.metadata.total_size, 8192 * 3 + 256 + 512);
    assert.deepEqual(index.weight_map, {
      'a.weight': 'model-00001-of-00003.safetensors',
      'b.weight': 'model-00002-of-00003.safetensors',
      'c.weight': 'model-00003-of-00003.safetensors',
      'd.bias': 'model-00003-of-00003.safetensors',
      'e.weight': 'model-00003-of-00003.safetensors',
    });
    await withCheckpoint(dir, async (c) => {
      assert.equal(c.path, dir);
      assert.equal(c.layout.sharded, true);
      assert.deepEqual(c.layout.indexMetadata, { total_size: 8192 * 3 + 256 + 512 });
      assert.deepEqual(
        c.layout.files.map((f) => [f.fileName, f.metadata, f.tensors.map((t) => t.name)]),
        [
          ['model-00001-of-00003.safetensors', { format: 'pt' }, ['a.weight']],
          ['model-00002-of-00003.safetensors', { format: 'pt' }, ['b.weight']],
          ['model-00003-of-00003.safetensors', { format: 'pt' }, ['c.weight', 'd.bias', 'e.weight']],
        ],
      );
      assert.deepEqual(
        c.tensors().map((t) => t.name),
        ['a.weight', 'b.weight', 'c.weight', 'd.bias', 'e.weight'],
      );
      assert.equal(c.info('c.weight').file, join(dir, 'model-00003-of-00003.safetensors'));
      for (const t of big) assert.deepEqual(await c.readRaw(t.name), t.data, t.name);
    });
    for (const f of await readdir(dir)) {
      if (!f.endsWith('.safetensors')) continue;
      const headerLength = (await readFile(join(dir, f))).readBigUInt64LE(0);
      assert.equal(headerLength % 8n, 0n, `${f}: data area starts 8-byte aligned`);
    }
  });
});

void describe('reading a hand-laid file', () => {
  void it('follows the format definition byte for byte', async () => {
    // Keys deliberately not in data order; offsets relative to the data area.
    const header =
      '{"w16":{"dtype":"F16","shape":[2],"data_offsets":[12,16]},' +
      '"__metadata__":{"format":"pt"},' +
      '"w32":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' +
      '"wbf":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}';
    const data = new Uint8Array([
      0x00,
      0x00,
      0xc0,
      0x3f,
      0x00,
      0x00,
      0x00,
      0xc0, // F32 1.5, -2
      0x80,
      0x3f,
      0x00,
      0xbf, // BF16 1.0, -0.5
      0x00,
      0x3c,
      0xff,
      0x7b, // F16 1.0, 65504
    ]);
    const file = await craftFile(header, data);
    await withCheckpoint(file, async (c) => {
      assert.deepEqual(
        c.tensors().map((t) => t.name),
        ['w32', 'wbf', 'w16'],
      );
      assert.deepEqual(c.layout.files[0]!.metadata, { format: 'pt' });
      const headerBytes = Buffer.byteLength(header);
      assert.equal(c.info('w32').dataOffset, 8 + headerBytes);
      assert.equal(c.info('w16').dataOffset, 8 + headerBytes + 12);
      assert.deepEqual(c.info('wbf').shape, [1, 2]);
      assert.deepEqual([...(await c.readF32('w32'))], [1.5, -2]);
      assert.deepEqual([...(await c.readF32('wbf'))], [1, -0.5]);
      assert.deepEqual([...(await c.readF32('w16'))], [1, 65504]);
      assert.deepEqual([...(await c.readRangeF32('w16', 1, 1))], [65504]);
      assert.deepEqual([...(await c.readRawRange('w32', 4, 4))], [0x00, 0x00, 0x00, 0xc0]);
    });
  });
});

void describe('partial reads and lookups', () => {
  void it('readRangeF32 returns the requested elements, and rejects ranges outside the tensor', async () => {
    const dir = fresh('range');
    const t = tensor('big', 'BF16', [10, 100]);
    await writeCheckpoint(dir, [t]);
    await withCheckpoint(dir, async (c) => {
      const whole = await c.readF32('big');
      assert.deepEqual(u32(await c.readRangeF32('big', 250, 300)), u32(whole.subarray(250, 550)));
      assert.equal((await c.readRangeF32('big', 1000, 0)).length, 0);
      await assert.rejects(
        c.readRangeF32('big', 999, 2),
        (e: Error) => e instanceof RangeError && e.message.includes('"big"'),
      );
      await assert.rejects(c.readRangeF32('big', -1, 1), RangeError);
      await assert.rejects(c.readRawRange('big', 0, 2001), RangeError);
    });
  });

  void it('large tensors (several read chunks) read back exactly, also into a reused array', async () => {
    const dir = fresh('large');
    const ts = [
      tensor('f16', 'F16', [1536, 1025]),
      tensor('bf', 'BF16', [1024, 1537]),
      tensor('f32', 'F32', [700, 1023]),
    ];
    await writeCheckpoint(dir, ts);
    await withCheckpoint(dir, async (c) => {
      const into = new Float32Array(2_000_000);
      for (const t of ts) {
        assert.ok(sameBytes(await c.readRaw(t.name), t.data), t.name);
        const expected = decodeToF32(
          t.data,
          t.dtype,
          new Float32Array(t.data.byteLength / (t.dtype === 'F32' ? 4 : 2)),
        );
        assert.ok(sameBytes(await c.readF32(t.name), expected), t.name);
        const part = await c.readRangeF32(t.name, 123_457, 500_001, { into });
        assert.equal(part.buffer, into.buffer);
        assert.equal(part.length, 500_001);
        assert.ok(sameBytes(part, expected.subarray(123_457, 623_458)), t.name);
        assert.ok(
          sameBytes(await c.readRawRange(t.name, 99_999, 1_100_001), t.data.subarray(99_999, 1_200_000)),
          t.name,
        );
      }
      await assert.rejects(c.readF32('bf', { into: new Float32Array(10) }), RangeError);
    });
  });

  void it('a file that shrinks after opening gives TruncatedError on read', async () => {
    const dir = fresh('shrink');
    await writeCheckpoint(dir, [tensor('small', 'F32', [100]), tensor('big', 'BF16', [1024, 1024])]);
    const file = join(dir, 'model.safetensors');
    await withCheckpoint(dir, async (c) => {
      await truncate(file, c.info('big').dataOffset + 1_500_000);
      await rejectsWith(c.readRaw('big'), TruncatedError, [file, 'tensor "big"']);
      await rejectsWith(c.readF32('big'), TruncatedError, [file, 'tensor "big"']);
      await truncate(file, c.info('small').dataOffset + 10);
      await rejectsWith(c.readRaw('small'), TruncatedError, [file, 'tensor "small"']);
    });
  });

  void it('info/has on an absent tensor: FormatError naming the checkpoint and tensor', async () => {
    const dir = fresh('lookup');
    await writeCheckpoint(dir, [tensor('x', 'F32', [2])]);
    await withCheckpoint(dir, async (c) => {
      assert.equal(c.has('x'), true);
      assert.equal(c.has('y'), false);
      assert.throws(
        () => c.info('y'),
        (e: unknown) => {
          assert.ok(e instanceof FormatError);
          assert.equal(e.tensor, 'y');
          assert.equal(e.file, join(dir, 'model.safetensors'));
          assert.ok(e.message.includes(`${join(dir, 'model.safetensors')}, tensor "y"`));
          return true;
        },
      );
      await assert.rejects(c.readRaw('y'), FormatError);
    });
  });

  void it('honours an aborted signal and refuses reads after close', async () => {
    const dir = fresh('abort');
    await writeCheckpoint(dir, [tensor('x', 'F32', [4])]);
    const c = await Checkpoint.open(dir);
    const ac = new AbortController();
    ac.abort();
    await assert.rejects(c.readRaw('x', { signal: ac.signal }), { name: 'AbortError' });
    await c.close();
    await c.close();
    await assert.rejects(c.readRaw('x'), /closed/);
  });

  void it('handles tensors beyond 2^32 elements (sparse file)', async () => {
    const rows = 65536;
    const cols = 65537; // rows * cols > 2^32
    const numel = rows * cols;
    const header = JSON.stringify({ huge: { dtype: 'BF16', shape: [rows, cols], data_offsets: [0, numel * 2] } });
    const file = await craftFile(header);
    const dataStart = 8 + Buffer.byteLength(header);
    await truncate(file, dataStart + numel * 2);
    const at = numel - 3; // an element index above 2^32
    assert.ok(at > 2 ** 32);
    const fh = await open(file, 'r+');
    await fh.write(new Uint8Array([0x80, 0x3f, 0x00, 0xc0, 0x40, 0x40]), 0, 6, dataStart + at * 2);
    await fh.close();
    await withCheckpoint(file, async (c) => {
      assert.equal(c.info('huge').numel, numel);
      assert.equal(c.info('huge').byteLength, numel * 2);
      assert.deepEqual([...(await c.readRangeF32('huge', at - 1, 4))], [0, 1, -2, 3]);
    });
    await rm(file);
  });
});

void describe('bad inputs give typed errors naming file and tensor', () => {
  const good = {
    a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
    b: { dtype: 'BF16', shape: [2], data_offsets: [8, 12] },
  };
  const data = new Uint8Array(12);

  void it('accepts the baseline used below', async () => {
    await withCheckpoint(await craftFile(good, data), (c) => assert.equal(c.tensors().length, 2));
  });

  void it('truncated file', async () => {
    const dir = fresh('trunc');
    await writeCheckpoint(dir, [tensor('first', 'F32', [16]), tensor('last', 'F32', [16])]);
    const file = join(dir, 'model.safetensors');
    await truncate(file, (await stat(file)).size - 5);
    await rejectsWith(Checkpoint.open(dir), TruncatedError, [file, 'tensor "last"']);
  });

  void it('file shorter than the length prefix', async () => {
    const file = `${fresh('tiny')}.safetensors`;
    await writeFile(file, new Uint8Array([1, 2, 3]));
    await rejectsWith(Checkpoint.open(file), TruncatedError, [file]);
  });

  void it('header length beyond the file', async () => {
    const bytes = craft(good, data);
    bytes[0] = 0xff;
    bytes[1] = 0xff;
    const file = `${fresh('hdrlen')}.safetensors`;
    await writeFile(file, bytes);
    await rejectsWith(Checkpoint.open(file), TruncatedError, [file, 'header length 65535']);
  });

  void it('header length over the cap', async () => {
    const file = await craftFile(good, data);
    await rejectsWith(Checkpoint.open(file, { maxHeaderBytes: 16 }), FormatError, [file, 'exceeds the limit']);
    const bytes = craft(good, data);
    bytes[7] = 0xff; // ~2^63: must not be misread as a number
    await writeFile(file, bytes);
    await rejectsWith(Checkpoint.open(file), FormatError, [file, 'exceeds the limit']);
  });

  void it('header not JSON, or not an object', async () => {
    const f1 = await craftFile('{"a": {"dtype": "F32",', new Uint8Array(0));
    const e = await rejectsWith(Checkpoint.open(f1), FormatError, [f1, 'not valid UTF-8 JSON']);
    assert.ok(e.cause instanceof SyntaxError);
    const f2 = await craftFile('[1, 2]');
    await rejectsWith(Checkpoint.open(f2), FormatError, [f2, 'not a JSON object']);
    const f3 = await craftFile(new Uint8Array([0x7b, 0xff, 0x7d])); // invalid UTF-8
    await rejectsWith(Checkpoint.open(f3), FormatError, [f3]);
  });

  void it('entries missing fields or of the wrong type', async () => {
    const cases: [object, string][] = [
      [{ ...good, b: { shape: [2], data_offsets: [8, 12] } }, '"dtype"'],
      [{ ...good, b: { dtype: 'BF16', data_offsets: [8, 12] } }, '"shape"'],
      [{ ...good, b: { dtype: 'BF16', shape: [2.5], data_offsets: [8, 12] } }, '"shape"'],
      [{ ...good, b: { dtype: 'BF16', shape: [2], data_offsets: [8] } }, '"data_offsets"'],
      [{ ...good, b: { dtype: 'BF16', shape: [2], data_offsets: ['8', '12'] } }, '"data_offsets"'],
      [{ ...good, b: 'nope' }, 'not an object'],
      [{ ...good, b: { dtype: 'BF16', shape: [2], data_offsets: [12, 8] } }, 'end before'],
    ];
    for (const [header, mention] of cases) {
      const file = await craftFile(header, data);
      const err = await rejectsWith(Checkpoint.open(file), FormatError, [file, 'tensor "b"', mention]);
      assert.equal(err.tensor, 'b');
      assert.equal(err.file, file);
    }
    const meta = await craftFile({ __metadata__: { n: 1 }, ...good }, data);
    await rejectsWith(Checkpoint.open(meta), FormatError, [meta, '__metadata__', '"n"']);
  });

  void it('unknown dtype', async () => {
    for (const dtype of ['I8', 'F64']) {
      const file = await craftFile({ ...good, b: { dtype, shape: [2], data_offsets: [8, 12] } }, data);
      const err = await rejectsWith(Checkpoint.open(file), UnsupportedDtypeError, [file, 'tensor "b"', dtype]);
      assert.equal((err as UnsupportedDtypeError).dtype, dtype);
    }
  });

  void it('overlapping offsets', async () => {
    const file = await craftFile({ ...good, b: { dtype: 'BF16', shape: [2], data_offsets: [6, 10] } }, data);
    await rejectsWith(Checkpoint.open(file), FormatError, [file, 'tensor "b"', 'overlap', '"a"']);
  });

  void it('shape and byte length disagree', async () => {
    const file = await craftFile({ ...good, b: { dtype: 'BF16', shape: [3], data_offsets: [8, 12] } }, data);
    await rejectsWith(Checkpoint.open(file), FormatError, [file, 'tensor "b"', 'needs 6 bytes', 'span 4']);
  });

  void it('offsets outside the file', async () => {
    const file = await craftFile({ ...good, b: { dtype: 'BF16', shape: [2], data_offsets: [4000, 4004] } }, data);
    const err = await rejectsWith(Checkpoint.open(file), FormatError, [file, 'tensor "b"', 'outside the data area']);
    assert.ok(!(err instanceof TruncatedError));
  });

  void it('a null __metadata__ is accepted as absent', async () => {
    const file = await craftFile({ __metadata__: null, ...good }, data);
    await withCheckpoint(file, (c) => assert.equal(c.layout.files[0]!.metadata, undefined));
  });

  void it('zero-element tensors are fine, even sharing an offset', async () => {
    const file = await craftFile({ ...good, z: { dtype: 'F16', shape: [0], data_offsets: [8, 8] } }, data);
    await withCheckpoint(file, (c) => assert.equal(c.info('z').byteLength, 0));
  });

  void it('folder without weights', async () => {
    const dir = fresh('noweights');
    await mkdir(dir);
    await writeFile(join(dir, 'config.json'), '{}');
    await rejectsWith(Checkpoint.open(dir), FormatError, [dir, 'model.safetensors']);
  });

  void describe('sharded', () => {
    async function shardedDir(): Promise<string> {
      const dir = fresh('bad-sharded');
      await writeCheckpoint(dir, [tensor('p', 'F32', [4]), tensor('q', 'F32', [4]), tensor('r', 'F32', [4])], {
        shardBytes: 16,
      });
      return dir;
    }
    const indexOf = (dir: string): string => join(dir, 'model.safetensors.index.json');
    async function setIndex(dir: string, weightMap: Record<string, string>): Promise<void> {
      await writeFile(indexOf(dir), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    }

    void it('index naming a missing shard', async () => {
      const dir = await shardedDir();
      await rm(join(dir, 'model-00002-of-00003.safetensors'));
      await rejectsWith(Checkpoint.open(dir), FormatError, [
        indexOf(dir),
        'tensor "q"',
        'model-00002-of-00003.safetensors',
      ]);
    });

    void it('tensor listed in the index but missing from its shard', async () => {
      const dir = await shardedDir();
      await setIndex(dir, {
        p: 'model-00001-of-00003.safetensors',
        q: 'model-00002-of-00003.safetensors',
        r: 'model-00003-of-00003.safetensors',
        s: 'model-00003-of-00003.safetensors',
      });
      await rejectsWith(Checkpoint.open(dir), FormatError, [
        join(dir, 'model-00003-of-00003.safetensors'),
        'tensor "s"',
        'missing',
      ]);
    });

    void it('tensor present in two shards', async () => {
      const dir = await shardedDir();
      const twin = join(dir, 'model-00003-of-00003.safetensors');
      await writeFile(twin, craft({ q: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, new Uint8Array(4)));
      await rejectsWith(Checkpoint.open(dir), FormatError, [
        twin,
        'tensor "q"',
        'also present',
        'model-00002-of-00003.safetensors',
      ]);
    });

    void it('index placing a tensor in the wrong shard', async () => {
      const dir = await shardedDir();
      await setIndex(dir, {
        p: 'model-00001-of-00003.safetensors',
        q: 'model-00003-of-00003.safetensors',
        r: 'model-00002-of-00003.safetensors',
      });
      await rejectsWith(Checkpoint.open(dir), FormatError, ['tensor "q"', 'places this tensor']);
    });

    void it('index not JSON, or naming a path outside the folder', async () => {
      const dir = await shardedDir();
      await writeFile(indexOf(dir), '{"weight_map": ');
      await rejectsWith(Checkpoint.open(dir), FormatError, [indexOf(dir), 'not valid JSON']);
      await setIndex(dir, { p: '../elsewhere.safetensors' });
      await rejectsWith(Checkpoint.open(dir), FormatError, [indexOf(dir), 'tensor "p"', 'bare file name']);
      await writeFile(indexOf(dir), '{"metadata": {}}');
      await rejectsWith(Checkpoint.open(dir), FormatError, [indexOf(dir), 'weight_map']);
    });

    void it('a bad header in one shard names that shard', async () => {
      const dir = await shardedDir();
      const bad = join(dir, 'model-00002-of-00003.safetensors');
      await writeFile(bad, craft({ q: { dtype: 'I8', shape: [4], data_offsets: [0, 4] } }, new Uint8Array(4)));
      await rejectsWith(Checkpoint.open(dir), UnsupportedDtypeError, [bad, 'tensor "q"', 'I8']);
    });
  });
});

void describe('CheckpointWriter', () => {
  const layout = (): CheckpointLayout => ({
    sharded: false,
    indexMetadata: undefined,
    files: [
      {
        fileName: 'model.safetensors',
        metadata: { format: 'pt' },
        tensors: [
          { name: 'w', dtype: 'BF16', shape: [2, 2] },
          { name: 'v', dtype: 'F32', shape: [3] },
        ],
      },
    ],
  });
  const siblings = async (dir: string): Promise<string[]> => {
    const parent = join(dir, '..');
    const base = dir.slice(parent.length + 1);
    return (await readdir(parent)).filter((n) => n.startsWith(base));
  };

  void it('is invisible under outDir until commit, accepts tensors in any order', async () => {
    const out = fresh('writer');
    const w = await CheckpointWriter.create(out, layout());
    assert.ok(w.tmpDir.startsWith(`${out}.tmp-`));
    await w.writeTensorF32('v', new Float32Array([1, 2, 3]));
    // 1.00390625 (0x3F808000) ties to 0x3F80; 0x3F818000 rounds up to 0x3F82.
    await w.writeTensorF32(
      'w',
      new Float32Array(new Uint32Array([0x3f808000, 0x3f818000, 0xbf800000, 0x7f800000]).buffer),
    );
    assert.equal(await stat(out).catch(() => undefined), undefined);
    await w.commit();
    assert.deepEqual(await siblings(out), [out.slice(root.length + 1)]);
    await withCheckpoint(out, async (c) => {
      assert.deepEqual([...(await c.readRaw('w'))], [0x80, 0x3f, 0x82, 0x3f, 0x80, 0xbf, 0x80, 0x7f]);
      assert.deepEqual([...(await c.readF32('v'))], [1, 2, 3]);
      assert.deepEqual(
        c.tensors().map((t) => t.name),
        ['w', 'v'],
      );
      assert.deepEqual(c.layout.files[0]!.metadata, { format: 'pt' });
    });
  });

  void it('abort leaves nothing behind', async () => {
    const out = fresh('aborted');
    const w = await CheckpointWriter.create(out, layout());
    await w.writeTensor('w', new Uint8Array(8));
    await w.abort();
    await w.abort();
    assert.deepEqual(await siblings(out), []);
  });

  void it('commit with a missing tensor throws and leaves no outDir', async () => {
    const out = fresh('missing');
    const w = await CheckpointWriter.create(out, layout());
    await w.writeTensor('w', new Uint8Array(8));
    await rejectsWith(w.commit(), FormatError, ['tensor "v"', 'never written']);
    assert.deepEqual(await siblings(out), []);
  });

  void it('rejects wrong lengths, unknown tensors and double writes', async () => {
    const out = fresh('rejects');
    const w = await CheckpointWriter.create(out, layout());
    try {
      await rejectsWith(w.writeTensor('w', new Uint8Array(7)), FormatError, [
        join(out, 'model.safetensors'),
        'tensor "w"',
        '7 bytes',
      ]);
      await rejectsWith(w.writeTensorF32('v', new Float32Array(4)), FormatError, ['tensor "v"', '4 values']);
      await rejectsWith(w.writeTensor('nope', new Uint8Array(8)), FormatError, ['tensor "nope"', 'not in the layout']);
      await w.writeTensor('w', new Uint8Array(8));
      await rejectsWith(w.writeTensor('w', new Uint8Array(8)), FormatError, ['tensor "w"', 'twice']);
    } finally {
      await w.abort();
    }
  });

  void it('rejects invalid layouts', async () => {
    const l = layout();
    l.files[0]!.tensors.push({ name: 'w', dtype: 'F32', shape: [1] });
    await rejectsWith(CheckpointWriter.create(fresh('badlayout'), l), FormatError, ['tensor "w"', 'also appears']);
    const l2 = layout();
    l2.files[0]!.fileName = '../escape.safetensors';
    await rejectsWith(CheckpointWriter.create(fresh('badlayout'), l2), FormatError, ['bare']);
  });

  void it('refuses an existing outDir unless overwrite, and then replaces it', async () => {
    const out = fresh('existing');
    await writeCheckpoint(out, [tensor('old', 'F32', [1])]);
    await assert.rejects(CheckpointWriter.create(out, layout()), { code: 'EEXIST' });
    await assert.rejects(writeCheckpoint(out, [tensor('new', 'F32', [1])]), { code: 'EEXIST' });
    const fresh1 = tensor('new', 'F32', [1]);
    await writeCheckpoint(out, [fresh1], { overwrite: true });
    await withCheckpoint(out, async (c) => {
      assert.deepEqual(
        c.tensors().map((t) => t.name),
        ['new'],
      );
      assert.deepEqual(await c.readRaw('new'), fresh1.data);
    });
    assert.deepEqual(await siblings(out), [out.slice(root.length + 1)]);
  });

  void it('mirrors a sharded layout and its index, copying non-weight files', async () => {
    const src = fresh('mirror-src');
    const ts = [
      tensor('t0', 'BF16', [8, 8]),
      tensor('t1', 'F16', [8, 8]),
      tensor('t2', 'F32', [4, 8]),
      tensor('t3', 'BF16', [2]),
    ];
    await writeCheckpoint(src, ts, { shardBytes: 128, metadata: { format: 'pt' } });
    // An index as another tool might write it: extra metadata, stale total_size.
    const indexPath = join(src, 'model.safetensors.index.json');
    const srcIndex = JSON.parse(await readFile(indexPath, 'utf8')) as {
      metadata: Record<string, unknown>;
      weight_map: Record<string, string>;
    };
    await writeFile(
      indexPath,
      JSON.stringify({ metadata: { total_size: 1, producer: 'x' }, weight_map: srcIndex.weight_map }),
    );
    await writeFile(join(src, 'config.json'), '{"model_type":"llama"}');
    await writeFile(join(src, 'tokenizer.json'), '{"v":1}');
    await writeFile(join(src, 'pytorch_model.bin'), 'stale weights');
    await writeFile(join(root, 'blob-gen-config'), '{"do_sample":false}');
    await symlink(join(root, 'blob-gen-config'), join(src, 'generation_config.json'));
    await mkdir(join(src, 'subdir'));

    const out = fresh('mirror-out');
    await withCheckpoint(src, async (c) => {
      assert.equal(c.layout.files.length, 4);
      const w = await CheckpointWriter.create(out, c.layout, { copyExtraFilesFrom: src });
      for (const t of [...c.tensors()].reverse()) await w.writeTensor(t.name, await c.readRaw(t.name));
      await w.commit();
    });
    const srcFiles = (await readdir(src)).filter((n) => n.endsWith('.safetensors')).sort();
    assert.deepEqual(
      (await readdir(out)).sort(),
      [...srcFiles, 'config.json', 'generation_config.json', 'model.safetensors.index.json', 'tokenizer.json'].sort(),
    );
    for (const f of srcFiles) assert.deepEqual(await readFile(join(out, f)), await readFile(join(src, f)), f);
    assert.equal(await readFile(join(out, 'generation_config.json'), 'utf8'), '{"do_sample":false}');
    assert.equal((await stat(join(out, 'generation_config.json'))).isFile(), true);
    const outIndex = JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8')) as typeof srcIndex;
    assert.deepEqual(outIndex.weight_map, srcIndex.weight_map);
    assert.deepEqual(outIndex.metadata, { total_size: 128 + 128 + 128 + 4, producer: 'x' });
  });
});
