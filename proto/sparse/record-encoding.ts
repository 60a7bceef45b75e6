/**
 * A DeltaRecord kept with the protobuf bytes it was decoded from, so it can be written or sent again as it came
 * instead of encoded anew. See docs/design/sparse-chunks.md.
 */
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import type { DeltaRecord } from '../gen/dppa/v1/sparse.js';

/** Bytes {@link encodeSoleField} puts before a payload: a one-byte tag and a length of up to 5 varint bytes. */
export const SOLE_FIELD_HEADROOM = 6;

interface Encoding {
  bytes: Uint8Array;
  /** Spare bytes before `bytes` in their ArrayBuffer, which nothing else uses. */
  headroom: number;
}

const encodings = new WeakMap<DeltaRecord, Encoding>();

/**
 * Keeps `bytes` as the encoding of `record`; they must decode to it and must not change.
 * @param headroom - Bytes before `bytes` in their ArrayBuffer that nothing else uses, which
 *   {@link encodeSoleField} may then write its prefix into. @default 0
 */
export function rememberEncoding(record: DeltaRecord, bytes: Uint8Array, headroom = 0): void {
  encodings.set(record, { bytes, headroom });
}

/** The bytes `record` was decoded from, if they were remembered. */
export function encodingOf(record: DeltaRecord): Uint8Array | undefined {
  return encodings.get(record)?.bytes;
}

/**
 * The encoding of a message whose only field is the length-delimited field
 * `field` holding the bytes remembered for `record`: its tag, their length
 * as a varint, the bytes. It is written in the headroom before the bytes when
 * they were remembered with enough of it (the result is then a view of
 * their memory), else in one new Buffer.
 * @returns The encoding, as grpc-js sends it; undefined when nothing is remembered for `record`.
 */
export function encodeSoleField(field: number, record: DeltaRecord): Buffer | undefined {
  const enc = encodings.get(record);
  if (enc === undefined) return undefined;
  const { bytes, headroom } = enc;
  const head = new BinaryWriter().tag(field, WireType.LengthDelimited).uint32(bytes.byteLength).finish();
  if (head.length <= headroom) {
    const out = Buffer.from(bytes.buffer, bytes.byteOffset - head.length, head.length + bytes.byteLength);
    out.set(head, 0);
    return out;
  }
  const out = Buffer.allocUnsafe(head.length + bytes.byteLength);
  out.set(head, 0);
  out.set(bytes, head.length);
  return out;
}
