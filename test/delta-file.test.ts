import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FormatError, TruncatedError } from '../proto/errors.js';
import { DeltaHeader, DeltaRecord, TensorKind, ValueDtype, ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { serializeUploadRequest } from '../client/sdk/upload-client.js';
import { UploadRequest } from '../proto/gen/dppa/v1/upload.js';
import {
  DELTA_FILE_MAGIC,
  DeltaFileWriter,
  encodeChunks,
  encodeSoleField,
  encodingOf,
  rememberEncoding,
  SOLE_FIELD_HEADROOM,
  readDeltaFile,
  readDeltaHeader,
  readDeltaTensors,
  tensorRecords,
  type AssembledTensor,
  type PartitionEntries,
} from '../proto/sparse/index.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-delta-file-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function entries(positions: number[], scale = 1): PartitionEntries {
  return {
    positions: Float64Array.from(positions),
    values: Float32Array.from(positions, (p) => ((p % 7) - 3) * scale),
  };
}

const none = entries([]);
const BIG = 70000 * 65536;
const tensors: { name: string; shape: number[]; kind: TensorKind; partitions: PartitionEntries[] }[] = [
  {
    name: 'model.embed_tokens.weight',
    shape: [100, 8],
    kind: TensorKind.TENSOR_KIND_OUTSIDE,
    partitions: [entries(Array.from({ length: 800 }, (_, i) => i))],
  },
  {
    name: 'model.layers.0.self_attn.q_proj.weight',
    shape: [64, 64],
    kind: TensorKind.TENSOR_KIND_LINEAR,
    partitions: [none, entries(Array.from({ length: 300 }, (_, i) => 13 * i)), entries([1, 2, 3, 4000])],
  },
  {
    name: 'model.layers.0.self_attn.k_proj.weight',
    shape: [64, 64],
    kind: TensorKind.TENSOR_KIND_LINEAR,
    partitions: [none, none, none],
  },
  {
    name: 'lm_head.weight',
    shape: [70000, 65536],
    kind: TensorKind.TENSOR_KIND_OUTSIDE,
    partitions: [entries([BIG - 70000, BIG - 4097, BIG - 100, BIG - 2, BIG - 1], 0.25)],
  },
];

const header: DeltaHeader = DeltaHeader.fromPartial({
  formatVersion: 1,
  baseFingerprint: 'sha256:0123',
  method: 'dp',
  rate: 0.9,
  levels: [0.95, 0.9],
  options: { lambda: '0.08' },
  valueDtype: ValueDtype.VALUE_DTYPE_F32,
  tensors: [
    ...tensors.map((t) => ({
      name: t.name,
      shape: t.shape,
      kind: t.kind,
      layer: -1,
      levelRates: [0.9, 0.9],
      sent: true,
    })),
    {
      name: 'model.norm.weight',
      shape: [64],
      kind: TensorKind.TENSOR_KIND_OUTSIDE,
      layer: -1,
      levelRates: [0, 0],
      sent: false,
    },
  ],
  producer: 'test',
});

function allRecords(): DeltaRecord[] {
  const out: DeltaRecord[] = [{ header }];
  for (const t of tensors) {
    out.push(
      ...tensorRecords(t.name, t.shape, t.partitions, { maxChunkEntries: 128, valueDtype: ValueDtype.VALUE_DTYPE_F32 }),
    );
  }
  return out;
}

async function writeDelta(path: string, records: DeltaRecord[], opts: { highWaterMark?: number } = {}): Promise<void> {
  const writer = await DeltaFileWriter.create(path, opts);
  try {
    for (const r of records) await writer.write(r);
    await writer.close();
  } catch (err) {
    await writer.abort();
    throw err;
  }
}

async function readAll(path: string): Promise<DeltaRecord[]> {
  const out: DeltaRecord[] = [];
  for await (const r of readDeltaFile(path)) out.push(r);
  return out;
}

const encoded = (r: DeltaRecord): Buffer => Buffer.from(DeltaRecord.encode(r).finish());

async function rejectsWith(
  p: Promise<unknown>,
  type: typeof FormatError,
  file: string,
  pattern?: RegExp,
): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof type, `expected ${type.name}, got ${String(e)}`);
    assert.equal(e.name, type.name);
    assert.equal(e.file, file);
    if (pattern !== undefined) assert.match(e.message, pattern);
    return true;
  });
}

void describe('.dppa files', () => {
  let path: string;
  let bytes: Buffer;
  const records = allRecords();

  before(async () => {
    path = join(dir, 'party-a.dppa');
    await writeDelta(path, records, { highWaterMark: 4096 });
    bytes = await readFile(path);
  });

  void it('round-trips a header and several tensors record by record', async () => {
    assert.deepEqual(bytes.subarray(0, 8), Buffer.from(DELTA_FILE_MAGIC));
    assert.deepEqual(bytes.subarray(bytes.length - 4), Buffer.alloc(4));
    const back = await readAll(path);
    assert.equal(back.length, records.length);
    back.forEach((r, i) => assert.deepEqual(encoded(r), encoded(records[i]!), `record ${i}`));
    assert.deepEqual(await readDeltaHeader(path), header);
    assert.deepEqual(await readdir(dir), ['party-a.dppa']);
  });

  void it('reads transiently the same records, each valid until the next, in fewer buffers than records', async () => {
    const memory = new Set<ArrayBufferLike>();
    // The first chunk of the last read: its view, and a copy of its bytes then.
    let view: Uint8Array | undefined;
    let copy: Buffer | undefined;
    for (let round = 0; round < 2; round++) {
      let i = 0;
      view = undefined;
      for await (const r of readDeltaFile(path, { transient: true })) {
        // Compared before the next record is asked for: its bytes may then be overwritten.
        assert.deepEqual(encoded(r), encoded(records[i]!), `round ${round}, record ${i}`);
        if (r.chunk !== undefined) {
          memory.add(r.chunk.values.buffer);
          if (view === undefined) {
            view = r.chunk.values;
            copy = Buffer.from(view);
          }
        }
        i++;
      }
      assert.equal(i, records.length);
    }
    // Two reads of the whole file through one reused read buffer (records here are far below its size).
    assert.equal(memory.size, 1);
    // A transient read of a format-2 file (fine-tuned values, another header) takes the same buffer again...
    const finetuned = join(dir, 'party-a-f.dppa');
    const f2: DeltaRecord[] = [
      { header: { ...header, formatVersion: 2, valueKind: ValueKind.VALUE_KIND_FINETUNED } },
      ...tensors.flatMap((t) => [
        ...tensorRecords(
          t.name,
          t.shape,
          t.partitions.map((e) => ({ positions: e.positions, values: e.values.map((v) => v + 0.5) })),
          { maxChunkEntries: 128, valueDtype: ValueDtype.VALUE_DTYPE_F32 },
        ),
      ]),
    ];
    await writeDelta(finetuned, f2);
    let i = 0;
    for await (const r of readDeltaFile(finetuned, { transient: true })) {
      assert.deepEqual(encoded(r), encoded(f2[i]!), `format 2, record ${i}`);
      if (r.chunk !== undefined) memory.add(r.chunk.values.buffer);
      i++;
    }
    assert.equal(i, f2.length);
    assert.equal(f2[0]!.header!.valueKind, ValueKind.VALUE_KIND_FINETUNED);
    assert.equal(memory.size, 1);
    // ...so the earlier record's view now shows other bytes: it was valid only until the next read.
    assert.equal(copy!.length, view!.length);
    assert.notDeepEqual(Buffer.from(view!), copy);
    await rm(finetuned);
  });

  void it('reads back every tensor exactly, checked against the plan', async () => {
    const got: AssembledTensor[] = [];
    let sawHeader = false;
    for await (const item of readDeltaTensors(path)) {
      if (item.kind === 'header') sawHeader = true;
      else got.push(item.tensor);
    }
    assert.ok(sawHeader);
    assert.deepEqual(
      got.map((t) => t.name),
      tensors.map((t) => t.name),
    );
    for (const [i, t] of tensors.entries()) {
      assert.deepEqual(got[i]!.shape, t.shape.map(BigInt));
      assert.deepEqual(
        got[i]!.keptPerPartition,
        t.partitions.map((p) => p.positions.length),
      );
      for (const [p, e] of t.partitions.entries()) {
        assert.deepEqual(got[i]!.partitions[p]!.positions, e.positions);
        assert.deepEqual(got[i]!.partitions[p]!.values, e.values);
      }
    }
  });

  void it('keeps record order when writes are not awaited one by one', async () => {
    const p = join(dir, 'concurrent.dppa');
    const writer = await DeltaFileWriter.create(p, { highWaterMark: 1 });
    await Promise.all(records.map((r) => writer.write(r)));
    await writer.close();
    assert.deepEqual(await readFile(p), bytes);
    await rm(p);
  });

  void it('detects a file cut at any point (TruncatedError naming the file)', async () => {
    const firstRecord = 8 + 4 + bytes.readUInt32LE(8);
    const cuts = [
      0,
      3,
      7,
      8,
      10,
      12,
      20,
      firstRecord,
      firstRecord + 2,
      firstRecord + 30,
      bytes.length >> 1,
      bytes.length - 40,
      bytes.length - 4,
      bytes.length - 1,
    ];
    const p = join(dir, 'cut.dppa');
    for (const cut of cuts) {
      await writeFile(p, bytes.subarray(0, cut));
      await rejectsWith(readAll(p), TruncatedError, p);
    }
    await writeFile(p, bytes.subarray(0, 10));
    await rejectsWith(readDeltaHeader(p), TruncatedError, p, /without its end marker|cut off/);
    await writeFile(p, bytes.subarray(0, firstRecord - 5));
    await rejectsWith(readDeltaHeader(p), TruncatedError, p, /record 0 at byte 8 is cut off/);
    await rm(p);
  });

  void it('names the tensor being read when a cut falls inside it', async () => {
    const p = join(dir, 'cut-tensor.dppa');
    await writeFile(p, bytes.subarray(0, bytes.length - 40));
    await assert.rejects(readAll(p), (e: unknown) => e instanceof TruncatedError && e.tensor === 'lm_head.weight');
    await rm(p);
  });

  void it('rejects a wrong magic, version or line-ending damage (FormatError)', async () => {
    const p = join(dir, 'magic.dppa');
    const variants: [Buffer, RegExp][] = [
      [Buffer.concat([Buffer.from('PK\x03\x04'), bytes.subarray(4)]), /wrong magic/],
      [Buffer.from('hello'), /wrong magic/],
      [Buffer.concat([bytes.subarray(0, 5), Buffer.of(2), bytes.subarray(6)]), /container version 2/],
      [Buffer.concat([bytes.subarray(0, 6), Buffer.of(0x0a), bytes.subarray(8)]), /wrong magic/],
    ];
    for (const [content, pattern] of variants) {
      await writeFile(p, content);
      await rejectsWith(readAll(p), FormatError, p, pattern);
    }
    await rm(p);
  });

  void it('rejects framing errors (FormatError naming the file)', async () => {
    const p = join(dir, 'framing.dppa');
    const frame = (r: DeltaRecord): Buffer => {
      const body = encoded(r);
      const len = Buffer.alloc(4);
      len.writeUInt32LE(body.length);
      return Buffer.concat([len, body]);
    };
    const magic = Buffer.from(DELTA_FILE_MAGIC);
    const end = Buffer.alloc(4);
    const cases: [Buffer, RegExp][] = [
      [Buffer.concat([bytes, Buffer.of(0)]), /data after the end marker/],
      [Buffer.concat([magic, end]), /no records/],
      [Buffer.concat([magic, Buffer.from([0xff, 0xff, 0xff, 0x7f])]), /over the 16777216-byte limit/],
      [Buffer.concat([magic, frame(records[1]!), end]), /first record must be a DeltaHeader/],
      [Buffer.concat([magic, frame({ header }), frame({ header }), end]), /second DeltaHeader/],
      [Buffer.concat([magic, frame({ header: { ...header, formatVersion: 2 } }), end]), /format_version is 2/],
      [
        Buffer.concat([magic, frame({ header }), Buffer.from([2, 0, 0, 0, 0xff, 0xff]), end]),
        /not a valid DeltaRecord/,
      ],
      // A record holding only an unknown field decodes to an empty DeltaRecord.
      [Buffer.concat([magic, frame({ header }), Buffer.from([2, 0, 0, 0, 0x48, 0x01]), end]), /0 of header/],
    ];
    for (const [content, pattern] of cases) {
      await writeFile(p, content);
      await rejectsWith(readAll(p), FormatError, p, pattern);
    }
    await rm(p);
  });

  void it('rejects a tensor that breaks the plan or its own records', async () => {
    const p = join(dir, 'plan.dppa');
    const check = async (rs: DeltaRecord[], pattern: RegExp): Promise<void> => {
      await writeDelta(p, rs);
      const run = async (): Promise<void> => {
        for await (const item of readDeltaTensors(p)) void item;
      };
      await rejectsWith(run(), FormatError, p, pattern);
    };
    const [, ...rest] = records;
    await check([{ header: { ...header, tensors: header.tensors.slice(1) } }, ...rest], /not the next planned tensor/);
    await check(records.slice(0, -1), /file ends inside the tensor/);
    const firstEnd = records.findIndex((r) => r.tensorEnd !== undefined);
    await check(records.slice(0, firstEnd + 1), /3 planned tensors missing/);
    const shapes = { ...header, tensors: header.tensors.map((t, i) => (i === 1 ? { ...t, shape: [1n] } : t)) };
    await check([{ header: shapes }, ...rest], /differs from the planned/);
    const swapped = [...records];
    [swapped[2], swapped[3]] = [swapped[3]!, swapped[2]!];
    await check(swapped, /out of order/);
    await rm(p);
  });

  void it('stops when aborted', async () => {
    const ac = new AbortController();
    let n = 0;
    await assert.rejects(
      (async () => {
        for await (const r of readDeltaFile(path, { signal: ac.signal })) {
          void r;
          if (++n === 3) ac.abort();
        }
      })(),
      { name: 'AbortError' },
    );
    assert.equal(n, 3);
  });
});

void describe('DeltaFileWriter', () => {
  const exists = async (p: string): Promise<boolean> =>
    stat(p).then(
      () => true,
      () => false,
    );

  void it('shows nothing under the final name until closed', async () => {
    const p = join(dir, 'atomic.dppa');
    const writer = await DeltaFileWriter.create(p, { highWaterMark: 1 });
    await writer.write({ header });
    assert.equal(await exists(p), false);
    assert.equal(await exists(writer.tempPath), true);
    assert.ok(writer.tempPath.startsWith(`${p}.tmp-`));
    await writer.close();
    assert.equal(await exists(p), true);
    assert.equal(await exists(writer.tempPath), false);
    await writer.close();
    await rm(p);
  });

  void it('leaves nothing behind when aborted', async () => {
    const p = join(dir, 'aborted.dppa');
    const writer = await DeltaFileWriter.create(p, { highWaterMark: 1 });
    for (const r of allRecords().slice(0, 5)) await writer.write(r);
    await writer.abort();
    await writer.abort();
    assert.equal(await exists(p), false);
    assert.equal(await exists(writer.tempPath), false);
    await assert.rejects(writer.write({ header }), /aborted/);
    await assert.rejects(writer.close(), /aborted/);
  });

  void it('rejects records that break the rules, without writing them', async () => {
    const p = join(dir, 'rules.dppa');
    const writer = await DeltaFileWriter.create(p, { maxRecordBytes: 200 });
    const rs = allRecords();
    await rejectsWith(writer.write(rs[1]!), FormatError, p, /first record must be a DeltaHeader/);
    await rejectsWith(writer.write({ header: { ...header, formatVersion: 0 } }), FormatError, p, /format_version is 0/);
    await rejectsWith(writer.write({}), FormatError, p, /0 of header/);
    await writer.write({ header: { ...header, tensors: [] } });
    await rejectsWith(writer.write({ header }), FormatError, p, /second DeltaHeader/);
    const bigChunk = rs.find((r) => (r.chunk?.count ?? 0) > 100)!;
    await assert.rejects(
      writer.write(bigChunk),
      (e: unknown) =>
        e instanceof FormatError && e.tensor === bigChunk.chunk!.tensor && /over the 200-byte limit/.test(e.message),
    );
    await writer.close();
    assert.equal((await readAll(p)).length, 1);
    await rm(p);
  });

  void it('refuses to close a file without a header, leaving nothing', async () => {
    const p = join(dir, 'empty.dppa');
    const writer = await DeltaFileWriter.create(p);
    await rejectsWith(writer.close(), FormatError, p, /no record written/);
    assert.equal(await exists(p), false);
    assert.equal(await exists(writer.tempPath), false);
  });

  void it('leaves nothing at the final path when the rename fails', async () => {
    const sub = join(dir, 'fail');
    await mkdir(sub);
    const p = join(sub, 'taken.dppa');
    await mkdir(join(p, 'occupied'), { recursive: true });
    const writer = await DeltaFileWriter.create(p);
    await writer.write({ header });
    await assert.rejects(writer.close());
    assert.ok((await stat(p)).isDirectory());
    assert.deepEqual(await readdir(sub), ['taken.dppa']);
    await assert.rejects(writer.write({ header }), /aborted/);
  });
});

void describe('records read from a file, uploaded as read', () => {
  void it('are sent as the bytes they were read as, the same bytes encoding them gives', async () => {
    const path = join(dir, 'upload-as-read.dppa');
    await writeDelta(path, allRecords());
    let count = 0;
    for await (const record of readDeltaFile(path)) {
      assert.ok(encodingOf(record) !== undefined, "the reader remembers each record's bytes");
      const sent = serializeUploadRequest({ record });
      assert.deepEqual(sent, Buffer.from(UploadRequest.encode({ record }).finish()), `record ${count}`);
      assert.equal(sent.buffer, encodingOf(record)!.buffer, 'sent from the memory the record was read into');
      assert.deepEqual(
        UploadRequest.decode(sent).record,
        DeltaRecord.decode(Buffer.from(DeltaRecord.encode(record).finish())),
      );
      count++;
    }
    assert.equal(count, allRecords().length);
  });

  void it('encodes anything else as usual, and lengths of every varint size alike', () => {
    const open = { open: { jobId: 'j', party: 'p' } };
    assert.deepEqual(serializeUploadRequest(open), Buffer.from(UploadRequest.encode(open).finish()));
    const fresh: DeltaRecord = { header };
    assert.equal(encodingOf(fresh), undefined);
    assert.deepEqual(
      serializeUploadRequest({ record: fresh }),
      Buffer.from(UploadRequest.encode({ record: fresh }).finish()),
    );
    // Records whose encodings take 1-, 2- and 3-byte varint lengths, laid out as the generated code lays them out,
    // remembered without headroom (copied) and with it (prefixed in place).
    for (const n of [10, 1000, 30000]) {
      const [chunk] = [
        ...encodeChunks(
          'w',
          1,
          Float64Array.from({ length: n }, (_, i) => 2 * i),
          new Float32Array(n).fill(0.5),
          { valueDtype: ValueDtype.VALUE_DTYPE_F32 },
        ),
      ];
      const expected = Buffer.from(UploadRequest.encode({ record: { chunk: chunk! } }).finish());
      const bytes = DeltaRecord.encode({ chunk: chunk! }).finish();
      const copied: DeltaRecord = { chunk: chunk! };
      rememberEncoding(copied, bytes);
      assert.deepEqual(encodeSoleField(2, copied), expected, `${bytes.length}-byte record, copied`);
      const mem = new Uint8Array(SOLE_FIELD_HEADROOM + bytes.length).fill(0xee);
      mem.set(bytes, SOLE_FIELD_HEADROOM);
      const inPlace: DeltaRecord = { chunk: chunk! };
      rememberEncoding(inPlace, mem.subarray(SOLE_FIELD_HEADROOM), SOLE_FIELD_HEADROOM);
      const sent = encodeSoleField(2, inPlace)!;
      assert.deepEqual(sent, expected, `${bytes.length}-byte record, prefixed in place`);
      assert.equal(sent.buffer, mem.buffer, 'no copy');
    }
    assert.equal(encodeSoleField(2, fresh), undefined);
  });
});
