/**
 * Keeps each uploaded DeltaRecord's bytes as the party encoded them, so the spool writes chunks as they came, and
 * marks an undecodable message for the session to refuse. See docs/design/uploads.md.
 */
import type { DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import { UploadRequest, UploadServiceService } from '../../proto/gen/dppa/v1/upload.js';
import { encodingOf, rememberEncoding } from '../../proto/sparse/index.js';

/** UploadService's definition whose Upload deserializer also remembers each record's own bytes. */
export const UploadServiceKeepingRecords: typeof UploadServiceService = {
  ...UploadServiceService,
  upload: {
    ...UploadServiceService.upload,
    requestDeserialize: (buf: Buffer): UploadRequest => {
      let req: UploadRequest;
      try {
        req = UploadRequest.decode(buf);
      } catch (err) {
        const bad: UploadRequest = { open: undefined, record: undefined };
        failures.set(bad, err instanceof Error ? err : new Error(String(err)));
        return bad;
      }
      if (req.record !== undefined) {
        const bytes = soleRecordField(buf);
        if (bytes !== undefined) rememberEncoding(req.record, bytes);
      }
      return req;
    },
  },
};

/** Requests that stand for a message that did not decode, with the decoder's error. */
const failures = new WeakMap<UploadRequest, Error>();

/** Why the message `req` stands for did not decode; undefined for a decoded one. */
export function undecodable(req: UploadRequest): Error | undefined {
  return failures.get(req);
}

/** Bytes a chunk record's encoding may hold beyond its positions, values and name: tags, lengths and numbers. */
const CHUNK_FIELDS_BYTES = 64;

/**
 * The bytes a chunk record was received as, when they hold nothing but the
 * chunk: unknown fields, which decoding skips, would otherwise reach the disk
 * without counting against the party's upload limit.
 * @returns Its encoding, or undefined when the record is not a chunk, was not received through
 *   {@link UploadServiceKeepingRecords}, its message held more than the record, or it carries
 *   more bytes than its fields account for (then it must be encoded again).
 */
export function receivedEncoding(record: DeltaRecord): Uint8Array | undefined {
  const bytes = encodingOf(record);
  const chunk = record.chunk;
  if (bytes === undefined || chunk === undefined) return undefined;
  const fields = chunk.positions.length + chunk.values.length + Buffer.byteLength(chunk.tensor) + CHUNK_FIELDS_BYTES;
  return bytes.byteLength <= fields ? bytes : undefined;
}

/**
 * The payload of field 2 (`record`) of an UploadRequest when it is the
 * message's only field: tag byte 0x12, a varint length, then exactly the rest.
 * Anything else (another field, a repeated field that protobuf would merge)
 * gives undefined.
 */
function soleRecordField(buf: Uint8Array): Uint8Array | undefined {
  if (buf[0] !== 0x12) return undefined;
  let length = 0;
  let i = 1;
  for (let shift = 0; ; shift += 7, i++) {
    // A length takes at most 5 varint bytes (messages are far below 2^32 bytes).
    if (i > 5 || i >= buf.length) return undefined;
    const b = buf[i]!;
    length += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) break;
  }
  i++;
  return i + length === buf.length ? buf.subarray(i) : undefined;
}
