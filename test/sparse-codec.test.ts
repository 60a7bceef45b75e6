import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { uniform } from './fixtures/synthetic-model.js';
import { ChecksumError, FormatError, TruncatedError } from '../proto/errors.js';
import { PositionCoding, ValueDtype, type DeltaRecord, type SparseChunk } from '../proto/gen/dppa/v1/sparse.js';
import { decodeToF32, encodeFromF32, type Dtype } from '../proto/safetensors/dtype.js';
import { decodeGaps, encodeGaps } from '../proto/sparse/golomb.js';
import {
  addChunkScaled,
  addScaled,
  assembleTensor,
  checkChunk,
  chunkChecksum,
  crc32c,
  decodeChunk,
  encodeChunks,
  foldChunkCrc,
  golombParameter,
  MAX_GOLOMB_M,
  TensorAssembler,
  tensorRecords,
  TensorRecordStream,
  type PartitionEntries,
} from '../proto/sparse/index.js';

/** Positions of a Bernoulli(density) mask over `n` positions starting at `offset`. */
function randomMask(n: number, density: number, rand: () => number, offset = 0): Float64Array {
  if (density >= 1) return Float64Array.from({ length: n }, (_, i) => offset + i);
  const out: number[] = [];
  for (let i = 0; i < n; i++) if (rand() < density) out.push(offset + i);
  return Float64Array.from(out);
}

/** Values across many magnitudes and signs, most not representable in 16 bits. */
function randomValues(n: number, rand: () => number): Float32Array {
  return Float32Array.from({ length: n }, () => (rand() - 0.5) * 2 ** Math.floor(rand() * 40 - 30));
}

const DTYPES: [ValueDtype, Dtype][] = [
  [ValueDtype.VALUE_DTYPE_BF16, 'BF16'],
  [ValueDtype.VALUE_DTYPE_F16, 'F16'],
  [ValueDtype.VALUE_DTYPE_F32, 'F32'],
];

function roundTo(values: Float32Array, dtype: Dtype): Float32Array {
  return decodeToF32(encodeFromF32(values, dtype), dtype, new Float32Array(values.length));
}

function decodeAll(chunks: SparseChunk[]): { positions: Float64Array; values: Float32Array } {
  const decoded = chunks.map((c) => decodeChunk(c));
  const n = decoded.reduce((s, d) => s + d.positions.length, 0);
  const positions = new Float64Array(n);
  const values = new Float32Array(n);
  let at = 0;
  for (const d of decoded) {
    positions.set(d.positions, at);
    values.set(d.values, at);
    at += d.positions.length;
  }
  return { positions, values };
}

/** A copy of a chunk with some fields changed and its checksum made valid again. */
function resealed(chunk: SparseChunk, change: Partial<SparseChunk>): SparseChunk {
  const c = { ...chunk, ...change };
  c.crc32c = chunkChecksum(c);
  return c;
}

function assertError(fn: () => unknown, type: typeof FormatError, tensor: string, pattern?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof type, `expected ${type.name}, got ${String(err)}`);
    assert.equal(err.name, type.name);
    assert.equal(err.tensor, tensor);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return true;
  });
}

void describe('crc32c', () => {
  void it('matches the standard check value and the RFC 3720 vectors', () => {
    assert.equal(crc32c(new TextEncoder().encode('123456789')), 0xe3069283);
    assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa);
    assert.equal(crc32c(new Uint8Array(32).fill(0xff)), 0x62a8ab43);
    assert.equal(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i)), 0x46dd794e);
    assert.equal(crc32c(Uint8Array.from({ length: 32 }, (_, i) => 31 - i)), 0x113fdb5c);
    assert.equal(crc32c(new Uint8Array(0)), 0);
  });

  void it('continues from a seed exactly as over the concatenation, at every split', () => {
    const rand = uniform(1);
    const data = Uint8Array.from({ length: 77 }, () => Math.floor(rand() * 256));
    const whole = crc32c(data);
    for (let cut = 0; cut <= data.length; cut++) {
      assert.equal(crc32c(data.subarray(cut), crc32c(data.subarray(0, cut))), whole, `split at ${cut}`);
    }
    let byteByByte = 0;
    for (const b of data) byteByByte = crc32c(Uint8Array.of(b), byteByByte);
    assert.equal(byteByByte, whole);
  });

  void it('equals a bit-at-a-time reference at every memory alignment and length', () => {
    const reference = (bytes: Uint8Array): number => {
      let c = ~0;
      for (const b of bytes) {
        c ^= b;
        for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
      }
      return ~c >>> 0;
    };
    const rand = uniform(2);
    const memory = Uint8Array.from({ length: 4096 + 8 }, () => Math.floor(rand() * 256));
    for (let offset = 0; offset < 8; offset++) {
      for (const length of [0, 1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 4096]) {
        const view = memory.subarray(offset, offset + length);
        assert.equal(crc32c(view), reference(view), `offset ${offset}, length ${length}`);
      }
    }
  });
});

void describe('golombParameter', () => {
  void it('is the optimal parameter of a geometric source', () => {
    assert.equal(golombParameter(1, 10), 7);
    assert.equal(golombParameter(1, 2), 1);
    assert.equal(golombParameter(3, 4), 1);
    assert.equal(golombParameter(1, 100), 69);
    assert.equal(golombParameter(5, 5), 1);
    assert.equal(golombParameter(2, 2 ** 52), MAX_GOLOMB_M);
  });
});

void describe('Golomb gap decoding', () => {
  // Every decoding path: the 16-bit lookup table (b ≤ 12) with codewords too long for it, no table
  // (12 < b ≤ 25), and remainders read in two parts (b > 25); m = 1, powers of two (no short remainders).
  const params = [1, 2, 3, 7, 8, 9, 69, 4095, 4096, 4097, 2 ** 13 + 5, 2 ** 24, 2 ** 24 + 1, 2 ** 25 + 3, 2 ** 30];
  for (const m of params) {
    void it(`round-trips gaps around m = ${m} with rare long ones, and sees a cut or padded stream`, () => {
      const rand = uniform(m);
      const positions = new Float64Array(3000);
      positions[0] = Math.floor(rand() * 1000);
      for (let i = 1; i < positions.length; i++) {
        // Mostly a geometric-ish gap of about m; one in 50 about 40·m, whose unary part outgrows any table.
        const scale = rand() < 0.02 ? 40 * m : m;
        positions[i] = positions[i - 1]! + 1 + Math.floor(-Math.log(1 - rand()) * scale);
      }
      const bytes = encodeGaps(positions, 0, positions.length, m);
      const out = new Float64Array(positions.length);
      out[0] = positions[0]!;
      assert.equal(decodeGaps(bytes, m, out), 'ok');
      assert.deepEqual(out, positions);
      assert.equal(decodeGaps(bytes.subarray(0, bytes.length - 1), m, out), 'truncated');
      assert.equal(decodeGaps(Uint8Array.of(...bytes, 0), m, out), 'trailing-data');
      assert.equal(decodeGaps(Uint8Array.of(...bytes, 0x80), m, out), 'trailing-data');
    });
  }
});

void describe('encodeChunks / decodeChunk', () => {
  for (const density of [1e-4, 0.01, 0.1, 0.5, 1.0]) {
    for (const [valueDtype, dtype] of DTYPES) {
      void it(`round-trips a random mask at density ${density} in ${dtype}`, () => {
        const rand = uniform(Math.round(density * 1e6) + valueDtype);
        const positions = randomMask(200_000, density, rand, 12345);
        const values = randomValues(positions.length, rand);
        const chunks = [...encodeChunks('w', 2, positions, values, { valueDtype, maxChunkEntries: 40_000 })];
        assert.equal(chunks.length, Math.ceil(positions.length / 40_000));
        const back = decodeAll(chunks);
        assert.deepEqual(back.positions, positions);
        assert.deepEqual(back.values, roundTo(values, dtype));
        if (dtype === 'F32') assert.deepEqual(back.values, values);
        for (const c of chunks) {
          assert.equal(c.valueDtype, valueDtype);
          if (density === 1) {
            assert.equal(c.positionCoding, PositionCoding.POSITION_CODING_RANGE);
            assert.equal(c.positions.length, 0);
            assert.equal(c.golombM, 0);
          } else {
            assert.equal(c.positionCoding, PositionCoding.POSITION_CODING_GOLOMB);
            assert.ok(c.golombM >= 1);
          }
        }
      });
    }
  }

  void it('produces the worked example of docs/formats.md byte for byte', () => {
    const [c] = [...encodeChunks('w', 1, Float64Array.of(3, 5, 6, 20), Float32Array.of(1, -0.5, 0.25, 2))];
    assert.equal(c!.positionCoding, PositionCoding.POSITION_CODING_GOLOMB);
    assert.equal(c!.golombM, 3);
    assert.equal(Buffer.from(c!.positions).toString('hex'), '47a0');
    assert.equal(Buffer.from(c!.values).toString('hex'), '803f00bf803e0040');
    assert.equal(c!.crc32c, 0x8f3ed9bd);
  });

  void it('rounds to nearest, ties to even, in BF16 and F16', () => {
    const v = Float32Array.of(1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 3 * 2 ** -8));
    const [bf] = [...encodeChunks('t', 0, Float64Array.of(0, 1, 2, 3), v)];
    assert.deepEqual(decodeChunk(bf!).values, Float32Array.of(1, 1 + 2 ** -6, 1 + 2 ** -7, -(1 + 2 ** -6)));
    const h = Float32Array.of(1 + 2 ** -11, 1 + 3 * 2 ** -11, 65520, 65519);
    const [f16] = [...encodeChunks('t', 0, Float64Array.of(0, 1, 2, 3), h, { valueDtype: ValueDtype.VALUE_DTYPE_F16 })];
    assert.deepEqual(decodeChunk(f16!).values, Float32Array.of(1, 1 + 2 ** -9, Infinity, 65504));
  });

  void it('defaults to BF16 values and 262144-entry chunks', () => {
    const positions = Float64Array.from({ length: 262_145 }, (_, i) => 3 * i);
    const chunks = [...encodeChunks('t', 0, positions, new Float32Array(positions.length))];
    assert.deepEqual(
      chunks.map((c) => [c.count, c.valueDtype, c.values.length]),
      [
        [262_144, ValueDtype.VALUE_DTYPE_BF16, 2 * 262_144],
        [1, ValueDtype.VALUE_DTYPE_BF16, 2],
      ],
    );
  });

  void it('produces no chunk for no entries', () => {
    assert.equal([...encodeChunks('t', 0, new Float64Array(0), new Float32Array(0))].length, 0);
  });

  void it('stores one entry as a range', () => {
    const [c, ...rest] = [...encodeChunks('t', 1, Float64Array.of(77), Float32Array.of(0.5))];
    assert.equal(rest.length, 0);
    assert.equal(c!.positionCoding, PositionCoding.POSITION_CODING_RANGE);
    assert.equal(c!.firstPosition, 77n);
    const d = decodeChunk(c!);
    assert.deepEqual([...d.positions], [77]);
    assert.deepEqual([...d.values], [0.5]);
    assert.equal(d.partition, 1);
  });

  void it('splits at maxChunkEntries boundaries into chunks decodable alone', () => {
    const rand = uniform(7);
    const positions = randomMask(100_000, 0.2, rand);
    const values = randomValues(positions.length, rand);
    const max = 1000;
    const chunks = [...encodeChunks('t', 3, positions, values, { maxChunkEntries: max, firstIndex: 5 })];
    assert.equal(chunks.length, Math.ceil(positions.length / max));
    // Decode in reverse: no chunk depends on another.
    for (let k = chunks.length - 1; k >= 0; k--) {
      const c = chunks[k]!;
      assert.equal(c.index, 5 + k);
      assert.equal(c.count, Math.min(max, positions.length - k * max));
      assert.equal(c.firstPosition, BigInt(positions[k * max]!));
      const d = decodeChunk(c);
      assert.deepEqual(d.positions, positions.subarray(k * max, k * max + c.count));
    }
  });

  void it('keeps chunk values independent of the caller reusing its arrays', () => {
    const values = Float32Array.of(1.5, 2.5);
    const [c] = [...encodeChunks('t', 0, Float64Array.of(1, 5), values, { valueDtype: ValueDtype.VALUE_DTYPE_F32 })];
    values.fill(0);
    assert.deepEqual([...decodeChunk(c!).values], [1.5, 2.5]);
  });

  void it('codes positions beyond 2^32 exactly without a dense allocation ([70000, 65536])', () => {
    const numel = 70000 * 65536;
    const positions = Float64Array.of(numel - 70000, numel - 4097, numel - 100, numel - 2, numel - 1);
    const values = Float32Array.of(1, -2, 3, -4, 5);
    const before = process.memoryUsage().arrayBuffers;
    const records = [...tensorRecords('big', [70000, 65536], [{ positions, values }])];
    const t = assembleTensor(records);
    assert.ok(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024);
    assert.deepEqual(t.shape, [70000n, 65536n]);
    assert.deepEqual(t.partitions[0]!.positions, positions);
    assert.deepEqual(t.partitions[0]!.values, values);
  });

  void it('codes gaps beyond 2^32 and positions up to 2^53 exactly', () => {
    const cases = [
      Float64Array.of(5, 2 ** 33 + 7, 2 ** 33 + 8, 2 ** 40),
      Float64Array.of(0, 2 ** 53 - 3, 2 ** 53 - 1),
      Float64Array.of(2 ** 53 - 10, 2 ** 53 - 4, 2 ** 53 - 1),
      Float64Array.of(0, 1, 2, 3, 2 ** 45),
    ];
    for (const positions of cases) {
      const chunks = [...encodeChunks('t', 0, positions, new Float32Array(positions.length))];
      assert.deepEqual(decodeAll(chunks).positions, positions);
    }
  });

  void it(`meets 0.6 bytes per kept position at 10% density (1M positions), per-chunk overhead included`, () => {
    const rand = uniform(10);
    const positions = randomMask(10_000_000, 0.1, rand);
    let bytes = 0;
    for (const c of encodeChunks('t', 1, positions, new Float32Array(positions.length))) {
      // Tags, varints and the positions length prefix, as they appear on the wire.
      bytes += 1 + varintSize(c.firstPosition) + 1 + varintSize(BigInt(c.count)) + 1 + varintSize(BigInt(c.golombM));
      bytes += 1 + varintSize(BigInt(c.positions.length)) + c.positions.length;
    }
    const perPosition = bytes / positions.length;
    assert.ok(positions.length > 990_000);
    assert.ok(perPosition <= 0.6, `${perPosition} bytes per position`);
    assert.ok(perPosition >= 0.586, `${perPosition} is below the entropy bound: the measurement is wrong`);
  });

  void it('rejects invalid input, naming the tensor', () => {
    const enc = (p: number[], v = p.length, numel?: number): SparseChunk[] => [
      ...encodeChunks('bad', 0, Float64Array.from(p), new Float32Array(v), numel === undefined ? {} : { numel }),
    ];
    assertError(() => enc([1, 1]), FormatError, 'bad', /strictly increasing/);
    assertError(() => enc([3, 2]), FormatError, 'bad', /strictly increasing/);
    assertError(() => enc([0, 1.5]), FormatError, 'bad', /strictly increasing integers/);
    assertError(() => enc([-1, 2]), FormatError, 'bad', /non-negative integer/);
    assertError(() => enc([0, NaN]), FormatError, 'bad');
    assertError(() => enc([0, 2 ** 53]), FormatError, 'bad', /2\^53/);
    assertError(() => enc([1, 2], 3), FormatError, 'bad', /2 positions but 3 values/);
    assertError(() => enc([1, 10], 2, 10), FormatError, 'bad', /outside the tensor/);
    assert.throws(() => [...encodeChunks('x', -1, Float64Array.of(1), Float32Array.of(1))], RangeError);
    assert.throws(
      () => [...encodeChunks('x', 0, Float64Array.of(1), Float32Array.of(1), { maxChunkEntries: 0 })],
      RangeError,
    );
  });

  void describe('decodeChunk checks', () => {
    const rand = uniform(3);
    const positions = randomMask(50_000, 0.05, rand);
    const values = randomValues(positions.length, rand);
    const [chunk] = [...encodeChunks('layer.0.q', 2, positions, values, { firstIndex: 3 })];
    const c = chunk!;

    void it('detects a flipped byte in values, positions or any covered field (ChecksumError)', () => {
      const flip = (b: Uint8Array, i: number): Uint8Array => {
        const copy = Buffer.from(b);
        copy[i] = copy[i]! ^ 0x10;
        return copy;
      };
      const damaged: Partial<SparseChunk>[] = [
        { values: flip(c.values, 0) },
        { values: flip(c.values, c.values.length - 1) },
        { positions: flip(c.positions, 0) },
        { positions: flip(c.positions, c.positions.length >> 1) },
        { firstPosition: c.firstPosition + 1n },
        { count: c.count - 1 },
        { golombM: c.golombM + 1 },
        { partition: 1 },
        { index: 4 },
        { valueDtype: ValueDtype.VALUE_DTYPE_F16 },
        { positions: c.positions.subarray(0, c.positions.length - 1) },
      ];
      for (const change of damaged) {
        assertError(() => decodeChunk({ ...c, ...change }), ChecksumError, 'layer.0.q', /chunk \d: CRC-32C mismatch/);
      }
      assert.throws(
        () => decodeChunk({ ...c, crc32c: c.crc32c ^ 1 }, { file: 'f.dppa' }),
        (e: unknown) => {
          assert.ok(e instanceof ChecksumError);
          assert.equal(e.file, 'f.dppa');
          assert.match(e.message, /^f\.dppa, tensor "layer\.0\.q": chunk 3:/);
          return true;
        },
      );
    });

    void it('reports a truncated position stream with a valid checksum as TruncatedError', () => {
      for (const cut of [0, 1, c.positions.length >> 1, c.positions.length - 1]) {
        const truncated = resealed(c, { positions: c.positions.subarray(0, cut) });
        assertError(() => decodeChunk(truncated), TruncatedError, 'layer.0.q', /ends before|too short/);
      }
    });

    void it('rejects malformed chunks with a valid checksum (FormatError)', () => {
      const cases: [Partial<SparseChunk>, RegExp][] = [
        [{ count: 0, values: Buffer.alloc(0) }, /count is 0/],
        [{ values: c.values.subarray(2) }, /value bytes, expected/],
        [{ valueDtype: 9 as ValueDtype }, /unknown value dtype/],
        [{ positionCoding: PositionCoding.POSITION_CODING_UNSPECIFIED }, /unknown position coding/],
        [{ golombM: 0 }, /golomb_m 0/],
        [{ golombM: 2 ** 31 + 1 }, /golomb_m/],
        [{ positions: Buffer.concat([c.positions, Buffer.of(0xff)]) }, /data after/],
        [{ positionCoding: PositionCoding.POSITION_CODING_RANGE }, /RANGE chunk/],
        [{ firstPosition: 2n ** 60n }, /2\^53/],
      ];
      for (const [change, pattern] of cases) {
        const bad = resealed(c, change);
        assert.throws(
          () => decodeChunk(bad),
          (e: unknown) => {
            assert.ok(e instanceof FormatError && !(e instanceof ChecksumError), String(e));
            assert.equal(e.tensor, 'layer.0.q');
            assert.match(e.message, pattern);
            return true;
          },
        );
      }
      assertError(
        () => decodeChunk(c, { numel: positions[positions.length - 1]! }),
        FormatError,
        'layer.0.q',
        /outside the tensor/,
      );
      assert.equal(decodeChunk(c, { numel: positions[positions.length - 1]! + 1 }).positions.length, c.count);
    });

    void it('reads an unspecified value dtype as BF16', () => {
      const unspecified = resealed(c, { valueDtype: ValueDtype.VALUE_DTYPE_UNSPECIFIED });
      assert.deepEqual(decodeChunk(unspecified).values, decodeChunk(c).values);
    });
  });
});

void describe('tensor records', () => {
  const rand = uniform(11);
  const shape = [300, 400];
  const partitions: PartitionEntries[] = [
    { positions: new Float64Array(0), values: new Float32Array(0) },
    ...[0.05, 0.02, 0.1].map((d) => {
      const positions = randomMask(120_000, d, rand);
      return { positions, values: randomValues(positions.length, rand) };
    }),
  ];
  const opts = { maxChunkEntries: 1000, valueDtype: ValueDtype.VALUE_DTYPE_F32 };
  const records = [...tensorRecords('model.layers.0.mlp.up_proj.weight', shape, partitions, opts)];
  const name = 'model.layers.0.mlp.up_proj.weight';
  const chunkRecords = records.filter((r) => r.chunk !== undefined);

  void it('emits begin, the chunks of every partition in order, and a matching end', () => {
    assert.deepEqual(records[0], { tensorBegin: { name, shape: [300n, 400n] } });
    const chunks = chunkRecords.map((r) => r.chunk!);
    assert.deepEqual(
      chunks.map((c) => c.index),
      chunks.map((_, i) => i),
    );
    for (let i = 1; i < chunks.length; i++) assert.ok(chunks[i]!.partition >= chunks[i - 1]!.partition);
    const end = records[records.length - 1]!.tensorEnd!;
    assert.equal(end.name, name);
    assert.equal(end.chunkCount, chunks.length);
    assert.deepEqual(
      end.keptPerPartition,
      partitions.map((p) => BigInt(p.positions.length)),
    );
    assert.equal(
      end.crc32c,
      chunks.reduce((crc, c) => foldChunkCrc(crc, c.crc32c), 0),
    );
    const le = Buffer.alloc(4 * chunks.length);
    chunks.forEach((c, i) => le.writeUInt32LE(c.crc32c, 4 * i));
    assert.equal(end.crc32c, crc32c(le));
  });

  void it('assembles back into the partitions exactly', () => {
    const t = assembleTensor(records);
    assert.equal(t.name, name);
    assert.deepEqual(t.shape, [300n, 400n]);
    assert.deepEqual(
      t.keptPerPartition,
      partitions.map((p) => p.positions.length),
    );
    for (const [p, entries] of partitions.entries()) {
      assert.deepEqual(t.partitions[p]!.positions, entries.positions);
      assert.deepEqual(t.partitions[p]!.values, entries.values);
    }
  });

  void it('streams chunks in reused arrays without collecting them when asked', () => {
    const a = new TensorAssembler({ entries: 'stream' });
    const got = partitions.map(() => ({ positions: [] as number[], values: [] as number[] }));
    let previous: Float64Array | undefined;
    let reused = false;
    for (const r of records) {
      const c = a.push(r);
      if (c === undefined) continue;
      got[c.partition]!.positions.push(...c.positions);
      got[c.partition]!.values.push(...c.values);
      reused ||= previous !== undefined && previous.buffer === c.positions.buffer;
      previous = c.positions;
    }
    assert.ok(a.complete);
    assert.ok(reused, 'later chunks are decoded into the same memory');
    for (const [p, entries] of partitions.entries()) {
      assert.deepEqual(got[p]!.positions, [...entries.positions]);
      assert.deepEqual(got[p]!.values, [...entries.values]);
    }
    assert.equal(a.result().partitions[2]!.positions.length, 0);
  });

  void it('leaves values undecoded when asked, positions and checks unchanged', () => {
    const a = new TensorAssembler({ entries: 'stream', values: false });
    const positions = partitions.map(() => [] as number[]);
    for (const r of records) {
      const c = a.push(r);
      if (c === undefined) continue;
      assert.equal(c.values.length, 0, `chunk ${r.chunk!.index}: no values`);
      positions[c.partition]!.push(...c.positions);
    }
    assert.ok(a.complete);
    for (const [p, entries] of partitions.entries()) assert.deepEqual(positions[p], [...entries.positions]);
    // A damaged chunk is still refused.
    const bad = new TensorAssembler({ entries: 'stream', values: false });
    const chunk = records.find((r) => r.chunk !== undefined)!.chunk!;
    bad.push(records[0]!);
    const values = Buffer.from(chunk.values);
    values[0] = values[0]! ^ 1;
    assert.throws(() => bad.push({ chunk: { ...chunk, values } }), ChecksumError);
  });

  void it('adds RANGE chunks as runs, and still gives their positions when read', () => {
    const dense = {
      positions: Float64Array.from({ length: 2500 }, (_, i) => 700 + i),
      values: Float32Array.from({ length: 2500 }, (_, i) => i / 64),
    };
    const sparse = { positions: Float64Array.of(3, 9, 40), values: Float32Array.of(1, 2, 3) };
    const rs = [
      ...tensorRecords('d', [100, 40], [dense, sparse], {
        maxChunkEntries: 1000,
        valueDtype: ValueDtype.VALUE_DTYPE_F32,
      }),
    ];
    const viaRuns = new Float32Array(4000).fill(0.5);
    const viaPositions = new Float32Array(4000).fill(0.5);
    const a = new TensorAssembler({ entries: 'stream' });
    let ranges = 0;
    for (const r of rs) {
      const c = a.push(r);
      if (c === undefined) continue;
      if (c.range) ranges++;
      addChunkScaled(viaRuns, c, 1.5);
      addScaled(viaPositions, c.positions, c.values, 1.5);
    }
    assert.equal(ranges, 3, 'the dense partition travels as three RANGE chunks');
    assert.ok(a.complete);
    assert.deepEqual(viaRuns, viaPositions);
    assert.equal(viaRuns[700], 0.5 + 1.5 * 0);
    assert.equal(viaRuns[3199], 0.5 + 1.5 * (2499 / 64));
    assert.equal(viaRuns[699], 0.5);
  });

  void it('decodes a RANGE chunk of a whole large tensor without growing the scratch until its positions are read', () => {
    const numel = 1 << 26;
    const [chunk] = [
      ...encodeChunks('whole', 0, Float64Array.of(0, numel - 1), new Float32Array(0), {
        valueDtype: ValueDtype.VALUE_DTYPE_NONE,
      }),
    ];
    // A RANGE chunk as any client may send one (count = the tensor's size, no position bytes).
    const range = { ...chunk!, positionCoding: PositionCoding.POSITION_CODING_RANGE, positions: Buffer.alloc(0) };
    range.count = numel;
    range.golombM = 0;
    range.crc32c = chunkChecksum(range);
    const scratch = { positions: new Float64Array(0), values: new Float32Array(0) };
    const c = decodeChunk(range, { numel, skipValues: true }, scratch);
    assert.equal(c.count, numel);
    assert.equal(scratch.positions.length, 0);
    assert.equal(c.positions[numel - 1], numel - 1);
    assert.equal(scratch.positions.length, numel);
  });

  void it('checks a chunk without decoding positions (checkChunk), leaving a malformed bit stream to the decoder', () => {
    // A bit stream padded with extra bytes, re-checksummed: only a decoder can tell.
    const chunk = records.find((r) => r.chunk !== undefined && r.chunk.positions.length > 0)!.chunk!;
    const padded = { ...chunk, positions: Buffer.concat([chunk.positions, Buffer.from([0xff, 0xff])]) };
    padded.crc32c = chunkChecksum(padded);
    assert.equal(checkChunk(padded).count, chunk.count);
    assert.throws(() => decodeChunk(padded), /data after its/);
    // Too short to hold count − 1 gaps is seen without decoding.
    const cut = { ...chunk, positions: chunk.positions.subarray(0, 2) };
    cut.crc32c = chunkChecksum(cut);
    assert.throws(
      () => checkChunk(cut),
      (e: unknown) => e instanceof TruncatedError && /too short/.test(e.message),
    );
  });

  void it('rejects a chunk above the partition limit', () => {
    const a = new TensorAssembler({ maxPartition: 1 });
    assert.throws(() => {
      for (const r of records) a.push(r);
    }, /partition 2, but there are 1 partition/);
  });

  void it('gives the same records from pieces of whole chunks (TensorRecordStream), a valid tensor from any pieces', () => {
    const fromPieces = (size: number): DeltaRecord[] => {
      const stream = new TensorRecordStream(name, shape, opts);
      const out = [stream.begin()];
      for (const [p, e] of partitions.entries())
        for (let at = 0; at < e.positions.length; at += size) {
          const piece = { positions: e.positions.subarray(at, at + size), values: e.values.subarray(at, at + size) };
          out.push(...stream.chunks(p, piece));
        }
      out.push(stream.end(partitions.length));
      return out;
    };
    assert.deepEqual(fromPieces(3 * opts.maxChunkEntries), records);
    const uneven = fromPieces(2500);
    assert.ok(uneven.length > records.length);
    const t = assembleTensor(uneven);
    for (const [p, entries] of partitions.entries()) {
      assert.deepEqual(t.partitions[p]!.positions, entries.positions);
      assert.deepEqual(t.partitions[p]!.values, entries.values);
    }
  });

  void it('TensorRecordStream refuses partitions out of order, a piece not after its partition’s last, an end too short', () => {
    const piece = (...xs: number[]): PartitionEntries => ({
      positions: Float64Array.from(xs),
      values: new Float32Array(xs.length),
    });
    const refuses = (fn: () => unknown, pattern: RegExp): void =>
      assert.throws(
        fn,
        (e: unknown) => e instanceof RangeError && pattern.test(e.message) && e.message.includes('"t"'),
      );
    const s = new TensorRecordStream('t', [100], opts);
    const out = [s.begin(), ...s.chunks(0, piece(5, 9)), ...s.chunks(0, piece()), ...s.chunks(0, piece(10))];
    // The empty piece did not forget 10; a position repeated or going back across pieces is refused.
    refuses(() => [...s.chunks(0, piece(10, 11))], /partition 0's piece starts at position 10, expected above 10/);
    refuses(() => [...s.chunks(0, piece(3))], /starts at position 3, expected above 10/);
    // A new partition starts anywhere; an earlier one, even empty, is refused.
    out.push(...s.chunks(2, piece(0, 50)), ...s.chunks(2, piece(51)));
    refuses(() => [...s.chunks(1, piece())], /a piece of partition 1 after partition 2, expected partitions in order/);
    refuses(() => [...s.chunks(0, piece(99))], /a piece of partition 0 after partition 2/);
    refuses(() => [...s.chunks(2, piece(51))], /expected above 51/);
    // An end for fewer partitions than a piece named would drop that partition's count.
    refuses(() => s.end(2), /2 partitions, expected an integer above 2/);
    refuses(() => s.end(-1), /-1 partitions/);
    out.push(s.end(4));
    const t = assembleTensor(out);
    assert.deepEqual(t.keptPerPartition, [3, 0, 3, 0]);
    assert.deepEqual(Array.from(t.partitions[0]!.positions), [5, 9, 10]);
    assert.deepEqual(Array.from(t.partitions[2]!.positions), [0, 50, 51]);
  });

  void it('describes an empty tensor with a begin and an end saying 0', () => {
    const empty = { positions: new Float64Array(0), values: new Float32Array(0) };
    const rs = [...tensorRecords('e', [4, 4], [empty, empty, empty])];
    assert.equal(rs.length, 2);
    assert.deepEqual(rs[1]!.tensorEnd, { name: 'e', chunkCount: 0, keptPerPartition: [0n, 0n, 0n], crc32c: 0 });
    const t = assembleTensor(rs);
    assert.deepEqual(t.keptPerPartition, [0, 0, 0]);
    assert.equal(t.partitions[1]!.positions.length, 0);
  });

  void it('rejects positions outside the shape', () => {
    const p = { positions: Float64Array.of(0, 12), values: new Float32Array(2) };
    assertError(() => [...tensorRecords('s', [3, 4], [p])], FormatError, 's', /outside the tensor/);
  });

  void describe('assembler rejects', () => {
    const end = records[records.length - 1]!;
    const begin = records[0]!;
    const run = (rs: DeltaRecord[]): unknown => assembleTensor(rs, { file: 'x.dppa' });
    const check = (rs: DeltaRecord[], pattern: RegExp): void => {
      assert.throws(
        () => run(rs),
        (e: unknown) => {
          assert.ok(e instanceof FormatError, String(e));
          assert.equal(e.name, 'FormatError');
          assert.equal(e.tensor, name);
          assert.equal(e.file, 'x.dppa');
          assert.match(e.message, pattern);
          return true;
        },
      );
    };

    void it('an out-of-order chunk', () => {
      const rs = [...records];
      [rs[2], rs[3]] = [rs[3]!, rs[2]!];
      check(rs, /chunk 2 out of order: expected chunk 1/);
    });

    void it('a chunk of another tensor', () => {
      const rs = [...records];
      rs[1] = { chunk: resealed(rs[1]!.chunk!, { tensor: 'other' }) };
      check(rs, /names tensor "other"/);
    });

    void it('a missing chunk, in the middle or at the end', () => {
      check(
        records.filter((_, i) => i !== 5),
        /chunk 5 out of order: expected chunk 4/,
      );
      check(
        records.filter((_, i) => i !== records.length - 2),
        /tensor end says \d+ chunks, \d+ received/,
      );
    });

    void it('a bad end checksum, count or name', () => {
      const withEnd = (change: object): DeltaRecord[] => [
        ...records.slice(0, -1),
        { tensorEnd: { ...end.tensorEnd!, ...change } },
      ];
      check(withEnd({ crc32c: (end.tensorEnd!.crc32c ^ 1) >>> 0 }), /CRC-32C/);
      check(withEnd({ keptPerPartition: [0n, 1n, 2n, 3n] }), /entries in partition 1/);
      check(withEnd({ keptPerPartition: [0n] }), /partition 3 received, tensor end lists 1 partitions/);
      check(withEnd({ chunkCount: 1 }), /says 1 chunks/);
      const last = records.length - 2;
      const far = [...records];
      far[last] = { chunk: resealed(far[last]!.chunk!, { partition: 0xffffffff }) };
      check(far, /partition 4294967295 received, tensor end lists 4 partitions/);
      check(withEnd({ name: 'other' }), /tensor end names tensor "other"/);
    });

    void it('chunks in a decreasing partition or overlapping within a partition', () => {
      const rs = [...records];
      const last = rs.length - 2;
      rs[last] = { chunk: resealed(rs[last]!.chunk!, { partition: 1 }) };
      check(rs, /in partition 1 after partition 3/);
      const again = [...records];
      again[2] = { chunk: resealed(again[2]!.chunk!, { firstPosition: again[1]!.chunk!.firstPosition }) };
      check(again, /starts at position/);
    });

    void it('records out of place', () => {
      check([...records, end], /record after the tensor's end/);
      check([begin, begin], /second tensor begin/);
      check([begin, ...records.slice(1, 3)], /end not received/);
      assert.throws(() => run(records.slice(1)), /expected a tensor begin, got chunk/);
      check([begin, { header: { formatVersion: 1 } as never }], /unexpected header/);
    });

    void it('a damaged chunk, with ChecksumError', () => {
      const rs = [...records];
      const c = rs[4]!.chunk!;
      const values = Buffer.from(c.values);
      values[3] = values[3]! ^ 1;
      rs[4] = { chunk: { ...c, values } };
      assert.throws(
        () => run(rs),
        (e: unknown) => e instanceof ChecksumError && e.tensor === name && /chunk 3/.test(e.message),
      );
    });
  });
});

/** Bytes of `v` as a protobuf varint. */
function varintSize(v: bigint): number {
  let n = 1;
  while (v >= 0x80n) {
    v >>= 7n;
    n++;
  }
  return n;
}
