/**
 * The safetensors file header: a little-endian length, then JSON giving each tensor's dtype, shape and offsets.
 * See docs/design/safetensors.md.
 */

import type { FileHandle } from 'node:fs/promises';
import { FormatError, TruncatedError, UnsupportedDtypeError } from '../errors.js';
import { bytesPerElement, isDtype } from './dtype.js';
import { byteLengthOf, type LayoutTensor, type TensorInfo } from './layout.js';

/** Key of the free-form string map in a safetensors header. */
const METADATA_KEY = '__metadata__';

/** Default cap on the JSON header, as in the reference implementation (which uses 100 MB). */
export const DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** What a file's header says, validated against the file's size. */
export interface ParsedHeader {
  metadata: Record<string, string> | undefined;
  /** Tensors sorted by data offset. */
  tensors: TensorInfo[];
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

async function readExactly(fh: FileHandle, length: number, position: number, file: string): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0)
      throw new TruncatedError(`file ended at byte ${position + done} while reading the header`, { file });
    done += bytesRead;
  }
  return buf;
}

/**
 * Reads and validates the header of an open safetensors file.
 * @param fh Open handle of the file.
 * @param file Absolute path, used in TensorInfo and error messages.
 * @param fileSize Size of the file in bytes.
 * @param maxHeaderBytes Largest JSON header accepted.
 * @throws TruncatedError if the file is shorter than its header or a tensor's data.
 * @throws UnsupportedDtypeError for dtypes other than F32, F16 and BF16.
 * @throws FormatError for any other violation, naming the file and tensor.
 */
export async function readHeader(
  fh: FileHandle,
  file: string,
  fileSize: number,
  maxHeaderBytes: number,
): Promise<ParsedHeader> {
  if (fileSize < 8)
    throw new TruncatedError(`file is ${fileSize} bytes, too short for the 8-byte header length`, { file });
  const prefix = await readExactly(fh, 8, 0, file);
  const n = new DataView(prefix.buffer).getBigUint64(0, true);
  if (n > BigInt(maxHeaderBytes)) {
    throw new FormatError(`header length ${n} exceeds the limit of ${maxHeaderBytes} bytes`, { file });
  }
  const headerLength = Number(n);
  if (8 + headerLength > fileSize) {
    throw new TruncatedError(`header length ${headerLength} runs past the end of the file (${fileSize} bytes)`, {
      file,
    });
  }
  const bytes = await readExactly(fh, headerLength, 8, file);
  return parseHeader(bytes, file, 8 + headerLength, fileSize - 8 - headerLength);
}

function decodeJson(bytes: Uint8Array, file: string): unknown {
  try {
    return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes)) as unknown;
  } catch (cause) {
    throw new FormatError(`header is not valid UTF-8 JSON: ${(cause as Error).message}`, { file, cause });
  }
}

function parseMetadata(v: unknown, file: string): Record<string, string> {
  const where = { file, tensor: METADATA_KEY };
  if (!isPlainObject(v)) throw new FormatError(`must be an object of strings`, where);
  for (const [k, s] of Object.entries(v)) {
    if (typeof s !== 'string') throw new FormatError(`value of "${k}" is not a string`, where);
  }
  return v as Record<string, string>;
}

function isIntArray(v: unknown, length?: number): v is number[] {
  return (
    Array.isArray(v) &&
    (length === undefined || v.length === length) &&
    v.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)
  );
}

/**
 * Validates a decoded header and turns it into tensor descriptions.
 * @param bytes The JSON bytes (without the 8-byte length).
 * @param file Absolute path, for TensorInfo and messages.
 * @param dataStart Absolute offset of the data area.
 * @param dataSize Bytes available in the data area.
 * @throws As {@link readHeader}.
 */
export function parseHeader(bytes: Uint8Array, file: string, dataStart: number, dataSize: number): ParsedHeader {
  const json = decodeJson(bytes, file);
  if (!isPlainObject(json)) throw new FormatError(`header is not a JSON object`, { file });
  let metadata: Record<string, string> | undefined;
  const entries: { info: TensorInfo; begin: number; end: number }[] = [];
  for (const [name, entry] of Object.entries(json)) {
    if (name === METADATA_KEY) {
      // serde reads `null` as an absent Option, so the reference implementation accepts it.
      metadata = entry === null ? undefined : parseMetadata(entry, file);
      continue;
    }
    const where = { file, tensor: name };
    if (!isPlainObject(entry)) throw new FormatError(`header entry is not an object`, where);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== 'string') throw new FormatError(`"dtype" is missing or not a string`, where);
    if (!isIntArray(shape)) throw new FormatError(`"shape" is missing or not an array of non-negative integers`, where);
    if (!isIntArray(offsets, 2))
      throw new FormatError(`"data_offsets" is missing or not two non-negative integers`, where);
    if (!isDtype(dtype)) throw new UnsupportedDtypeError(dtype, where);
    const [begin, end] = offsets as [number, number];
    if (end < begin) throw new FormatError(`data_offsets [${begin}, ${end}] end before they begin`, where);
    const byteLength = byteLengthOf(dtype, shape, where);
    if (end - begin !== byteLength) {
      throw new FormatError(
        `shape ${JSON.stringify(shape)} of ${dtype} needs ${byteLength} bytes but data_offsets [${begin}, ${end}] span ${end - begin}`,
        where,
      );
    }
    const info: TensorInfo = {
      name,
      dtype,
      shape,
      numel: byteLength / bytesPerElement(dtype),
      byteLength,
      file,
      dataOffset: dataStart + begin,
    };
    entries.push({ info, begin, end });
  }
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  checkExtents(entries, file, dataSize);
  return { metadata, tensors: entries.map((e) => e.info) };
}

/**
 * Checks bounds and overlaps in offset order. Walking in that order makes the
 * first tensor past the end of a cut-off file the one that straddles the cut,
 * which is how a truncation (TruncatedError) is told from offsets that point
 * entirely outside the data (FormatError).
 */
function checkExtents(
  entries: { info: TensorInfo; begin: number; end: number }[],
  file: string,
  dataSize: number,
): void {
  let prev: { name: string; end: number } | undefined;
  for (const { info, begin, end } of entries) {
    const where = { file, tensor: info.name };
    if (begin > dataSize) {
      throw new FormatError(`data_offsets [${begin}, ${end}] lie outside the data area (${dataSize} bytes)`, where);
    }
    if (end > dataSize) {
      throw new TruncatedError(
        `data_offsets [${begin}, ${end}] run past the end of the data area (${dataSize} bytes)`,
        where,
      );
    }
    if (begin === end) continue;
    if (prev !== undefined && begin < prev.end) {
      throw new FormatError(
        `data_offsets [${begin}, ${end}] overlap tensor "${prev.name}" (ends at ${prev.end})`,
        where,
      );
    }
    prev = { name: info.name, end };
  }
}

/**
 * Builds the 8-byte length and JSON header of a file holding `tensors`
 * contiguously in the given order, padded with spaces so that the data starts
 * 8-byte aligned, as the reference implementation does.
 * @param file Names the file in error messages.
 * @returns The header bytes and each tensor's offset relative to the data area.
 * @throws FormatError if a shape is invalid.
 */
export function buildHeader(
  file: string,
  metadata: Record<string, string> | undefined,
  tensors: readonly LayoutTensor[],
): { bytes: Uint8Array; offsets: number[]; dataSize: number } {
  // Assembled by hand rather than via an object so that a tensor named
  // "__proto__" cannot reach the prototype.
  const parts: string[] = [];
  if (metadata !== undefined) parts.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(metadata)}`);
  const offsets: number[] = [];
  let at = 0;
  for (const t of tensors) {
    const size = byteLengthOf(t.dtype, t.shape, { file, tensor: t.name });
    offsets.push(at);
    parts.push(
      `${JSON.stringify(t.name)}:${JSON.stringify({ dtype: t.dtype, shape: t.shape, data_offsets: [at, at + size] })}`,
    );
    at += size;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const padded = Math.ceil(json.length / 8) * 8;
  const bytes = new Uint8Array(8 + padded).fill(0x20);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(padded), true);
  bytes.set(json, 8);
  return { bytes, offsets, dataSize: at };
}
