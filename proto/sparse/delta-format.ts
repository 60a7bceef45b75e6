/**
 * Constants and record rules of the `.dppa` container, shared by its writer
 * and reader so both enforce the same rules (layout: docs/formats.md).
 */
import { ValueKind, type DeltaHeader, type DeltaRecord } from '../gen/dppa/v1/sparse.js';
import { FormatError } from '../errors.js';
import { recordKind } from './tensor-records.js';

/** Version of the container framing, byte 5 of the magic. */
export const DELTA_FILE_VERSION = 1;

/**
 * The 8 bytes a `.dppa` file starts with: "DPPA", a NUL (marks the file as
 * binary), the container version, CR LF (damaged by any text-mode line-ending
 * conversion, which is then caught at once).
 */
export const DELTA_FILE_MAGIC: Uint8Array = Uint8Array.of(0x44, 0x50, 0x50, 0x41, 0x00, DELTA_FILE_VERSION, 0x0d, 0x0a);

/** `DeltaHeader.format_version` of a file whose values are deltas or merged weights: what older readers read. */
export const DELTA_FORMAT_VERSION = 1;

/** `DeltaHeader.format_version` of a file whose values are fine-tuned weights (VALUE_KIND_FINETUNED); the latest. */
export const FINETUNED_FORMAT_VERSION = 2;

/** The format version a header of this value kind carries. */
export function formatVersionOf(kind: ValueKind): number {
  return kind === ValueKind.VALUE_KIND_FINETUNED ? FINETUNED_FORMAT_VERSION : DELTA_FORMAT_VERSION;
}

/**
 * Checks a header's format version against its value kind: 1 for deltas and merged weights, 2 for fine-tuned weights.
 * @returns What is wrong, or undefined.
 */
export function formatVersionProblem(header: DeltaHeader): string | undefined {
  const v = header.formatVersion;
  if (v !== DELTA_FORMAT_VERSION && v !== FINETUNED_FORMAT_VERSION)
    return `DeltaHeader format_version is ${v}, this reader handles ${DELTA_FORMAT_VERSION} and ${FINETUNED_FORMAT_VERSION}`;
  const expected = formatVersionOf(header.valueKind);
  if (v !== expected)
    return `DeltaHeader format_version is ${v}, but value_kind ${header.valueKind} needs format_version ${expected}`;
  return undefined;
}

/** Largest record accepted by default: far above a default chunk (under 3 MiB), far below memory limits. */
export const DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024;

/** Bytes of the little-endian length before each record; a length of 0 is the end marker. */
export const RECORD_LENGTH_BYTES = 4;

/** Where a record is, for error messages. */
export interface RecordPlace {
  /** The file. */
  file: string;
  /** Tensor whose records are being read or written, if any. */
  tensor: string | undefined;
}

/**
 * Checks a record's place in the container: exactly one field set, a header
 * first and only first, with the supported format version.
 *
 * @param record - The record.
 * @param ordinal - Its position among the file's records, from 0.
 * @param where - File and current tensor, named in the error.
 * @throws FormatError when a rule is broken.
 */
export function checkRecordPlace(record: DeltaRecord, ordinal: number, where: RecordPlace): void {
  const set =
    Number(record.header !== undefined) +
    Number(record.tensorBegin !== undefined) +
    Number(record.chunk !== undefined) +
    Number(record.tensorEnd !== undefined);
  if (set !== 1) {
    throw new FormatError(
      `record ${ordinal} has ${set} of header/tensor_begin/chunk/tensor_end set, expected 1`,
      where,
    );
  }
  if (ordinal === 0) {
    if (record.header === undefined) {
      throw new FormatError(`the first record must be a DeltaHeader, got a ${recordKind(record)}`, where);
    }
    const problem = formatVersionProblem(record.header);
    if (problem !== undefined) throw new FormatError(problem, where);
  } else if (record.header !== undefined) {
    throw new FormatError(`record ${ordinal} is a second DeltaHeader`, where);
  }
}

/**
 * The tensor whose records follow a record: set by a begin, cleared by an end.
 *
 * @param current - Tensor before the record.
 * @param record - The record.
 */
export function tensorAfter(current: string | undefined, record: DeltaRecord): string | undefined {
  if (record.tensorBegin !== undefined) return record.tensorBegin.name;
  if (record.tensorEnd !== undefined) return undefined;
  return current;
}

/**
 * The tensor a record itself names, if any.
 *
 * @param record - The record.
 */
export function recordTensor(record: DeltaRecord): string | undefined {
  return record.chunk?.tensor ?? record.tensorBegin?.name ?? record.tensorEnd?.name;
}
