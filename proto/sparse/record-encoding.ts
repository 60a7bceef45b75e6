/**
 * The protobuf bytes a DeltaRecord was decoded from, kept beside it, so that
 * the record can be written or sent again as it came instead of being encoded
 * anew (encoding copies every byte once more and makes garbage). The server
 * spools received chunks this way (server/uploads/received-record.ts); the SDK
 * uploads the records of a `.dppa` file this way (client/sdk/upload-client.ts).
 * Only for records nothing modifies once decoded: the bytes are not updated.
 */
import type { DeltaRecord } from '../gen/dppa/v1/sparse.js';

const encodings = new WeakMap<DeltaRecord, Uint8Array>();

/** Keeps `bytes` as the encoding of `record`; they must decode to it and must not change. */
export function rememberEncoding(record: DeltaRecord, bytes: Uint8Array): void {
  encodings.set(record, bytes);
}

/** The bytes `record` was decoded from, if they were remembered. */
export function encodingOf(record: DeltaRecord): Uint8Array | undefined {
  return encodings.get(record);
}

/**
 * The encoding of a message whose only field is the length-delimited field
 * `field` holding `payload`: its tag, the payload's length as a varint, the
 * payload; in one new Buffer, as grpc-js sends it.
 */
export function encodeSoleField(field: number, payload: Uint8Array): Buffer {
  const head: number[] = [(field << 3) | 2];
  for (let n = payload.byteLength; ; n = Math.floor(n / 128)) {
    if (n < 128) {
      head.push(n);
      break;
    }
    head.push((n % 128) | 128);
  }
  const out = Buffer.allocUnsafe(head.length + payload.byteLength);
  out.set(head, 0);
  out.set(payload, head.length);
  return out;
}
