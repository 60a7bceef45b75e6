import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DeltaRecord, SparseChunk } from '../proto/gen/dppa/v1/sparse.js';
import { UploadRequest } from '../proto/gen/dppa/v1/upload.js';
import { encodeChunks } from '../proto/sparse/index.js';
import { receivedEncoding, UploadServiceKeepingRecords } from '../server/uploads/received-record.js';

const deserialize = UploadServiceKeepingRecords.upload.requestDeserialize;

void describe('received record bytes', () => {
  const chunk = [
    ...encodeChunks(
      'w',
      1,
      Float64Array.from({ length: 300 }, (_, i) => i * 7),
      new Float32Array(300).fill(0.5),
    ),
  ][0]!;
  const record: DeltaRecord = { chunk };
  const wire = Buffer.from(UploadRequest.encode({ record }).finish());

  void it('keeps the bytes of a record that is the whole message, exactly as encoded', () => {
    const req = deserialize(wire);
    // Decoded from a Buffer as the server's are, so that the bytes fields are Buffer views on both sides.
    assert.deepEqual(req.record, DeltaRecord.decode(Buffer.from(DeltaRecord.encode(record).finish())));
    const kept = receivedEncoding(req.record);
    assert.ok(kept !== undefined);
    assert.deepEqual(Buffer.from(kept), Buffer.from(DeltaRecord.encode(record).finish()));
  });

  void it('keeps nothing when the message holds more than one record field, or only an open', () => {
    // Protobuf merges a repeated message field, so its bytes are not one record's encoding.
    const twice = Buffer.concat([wire, wire]);
    const merged = deserialize(twice);
    assert.equal(receivedEncoding(merged.record!), undefined);
    const trailing = Buffer.concat([wire, Buffer.of(0x08, 0x01)]);
    assert.equal(receivedEncoding(deserialize(trailing).record!), undefined);
    const open = deserialize(Buffer.from(UploadRequest.encode({ open: { jobId: 'j', party: 'p' } }).finish()));
    assert.equal(open.record, undefined);
  });

  void it('keeps nothing when the record carries bytes its fields do not account for (unknown fields)', () => {
    // Field 15 of SparseChunk, unknown to this version: 64 KiB that decoding skips but raw bytes would keep.
    const extra = Buffer.concat([Buffer.of(0x7a, 0x80, 0x80, 0x04), Buffer.alloc(65536, 1)]);
    const chunkBytes = Buffer.concat([Buffer.from(SparseChunk.encode(chunk).finish()), extra]);
    const recordBytes = Buffer.concat([Buffer.of(0x1a), varint(chunkBytes.length), chunkBytes]);
    const message = Buffer.concat([Buffer.of(0x12), varint(recordBytes.length), recordBytes]);
    const req = deserialize(message);
    assert.deepEqual(
      req.record?.chunk,
      DeltaRecord.decode(Buffer.from(DeltaRecord.encode(record).finish())).chunk,
      'the unknown field is skipped',
    );
    assert.equal(receivedEncoding(req.record!), undefined);
  });
});

function varint(n: number): Buffer {
  const out: number[] = [];
  for (; n >= 0x80; n = Math.floor(n / 128)) out.push((n & 0x7f) | 0x80);
  out.push(n);
  return Buffer.from(out);
}
