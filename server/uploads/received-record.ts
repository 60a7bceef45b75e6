/**
 * The bytes of each uploaded DeltaRecord as the party encoded them, so that the
 * spool writes a received chunk as it came instead of encoding it again
 * (which, with the copy and the garbage it makes, cost the receiving thread
 * about as much as checking the chunk's CRC).
 */
import type { DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import { UploadRequest, UploadServiceService } from '../../proto/gen/dppa/v1/upload.js';

const encodings = new WeakMap<DeltaRecord, Uint8Array>();

/** UploadService's definition whose Upload deserializer also remembers each record's own bytes. */
export const UploadServiceKeepingRecords: typeof UploadServiceService = {
  ...UploadServiceService,
  upload: {
    ...UploadServiceService.upload,
    requestDeserialize: (buf: Buffer): UploadRequest => {
      const req = UploadRequest.decode(buf);
      if (req.record !== undefined) {
        const bytes = soleRecordField(buf);
        if (bytes !== undefined) encodings.set(req.record, bytes);
      }
      return req;
    },
  },
};

/**
 * The bytes a record was received as.
 * @returns Its encoding, or undefined when it was not received through {@link UploadServiceKeepingRecords}
 *   or its message held more than the record (then it must be encoded again).
 */
export function receivedEncoding(record: DeltaRecord): Uint8Array | undefined {
  return encodings.get(record);
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
