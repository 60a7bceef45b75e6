/**
 * Reading `.dppa` files as a stream of records, in bounded memory: one read
 * buffer and one record at a time, whatever the file's size.
 */
import { open } from 'node:fs/promises';
import { DeltaRecord, type DeltaHeader } from '../gen/dppa/v1/sparse.js';
import { FormatError, TruncatedError } from '../errors.js';
import { ByteSource } from './byte-source.js';
import { rememberEncoding, SOLE_FIELD_HEADROOM } from './record-encoding.js';
import {
  checkRecordPlace,
  DEFAULT_MAX_RECORD_BYTES,
  DELTA_FILE_MAGIC,
  RECORD_LENGTH_BYTES,
  recordTensor,
  tensorAfter,
} from './delta-format.js';
import { TensorAssembler, type AssembledTensor } from './tensor-assembler.js';

/** Options of {@link readDeltaFile}. */
export interface ReadDeltaOptions {
  /** Stops reading (the generator throws the signal's reason) between records. @default none */
  signal?: AbortSignal | undefined;
  /** Largest record accepted. @default 16 MiB ({@link DEFAULT_MAX_RECORD_BYTES}) */
  maxRecordBytes?: number | undefined;
  /**
   * Each record is valid only until the next one is asked for: its bytes fields may be views of a
   * read buffer reused for the next records, and its encoding is not kept. For a caller that consumes
   * each record at once (the merge): no fresh memory per record. @default false
   */
  transient?: boolean | undefined;
}

/** Read buffer of a transient read: most records (about 0.7 MB) fit in it several times over. */
const TRANSIENT_BUFFER_BYTES = 4 * 1024 * 1024;
/** Read buffers of finished transient reads, for the next: fresh memory costs a page fault per 4 KiB. */
const freeBuffers: Buffer[] = [];
/** At most this many buffers are kept (a thread reads a few files at once at most). */
const MAX_FREE_BUFFERS = 4;

/**
 * Streams the records of a `.dppa` file.
 *
 * Checks the framing and the container rules (magic and version, a header
 * first and only first, one field per record, record sizes, the end marker,
 * nothing after it); the records of each tensor are checked by
 * {@link TensorAssembler} (or {@link readDeltaTensors}). The file is closed
 * when the generator finishes, throws or is returned early.
 *
 * @param path - The file.
 * @param opts - Abort signal and record size limit.
 * @returns A generator of the records, header first.
 * @throws TruncatedError (naming the file) when the file ends before its end marker,
 *   in the magic or inside a record.
 * @throws FormatError (naming the file, and the tensor being read) for a wrong magic or
 *   version, an oversized or undecodable record, a broken container rule, or bytes
 *   after the end marker.
 * @throws The signal's reason when aborted; Error from the file system.
 */
export async function* readDeltaFile(
  path: string,
  opts: ReadDeltaOptions = {},
): AsyncGenerator<DeltaRecord, void, undefined> {
  const { signal } = opts;
  const maxRecordBytes = opts.maxRecordBytes ?? DEFAULT_MAX_RECORD_BYTES;
  signal?.throwIfAborted();
  const fh = await open(path, 'r');
  let buffer: Buffer | undefined;
  try {
    const transient = opts.transient === true;
    buffer = transient ? (freeBuffers.pop() ?? Buffer.allocUnsafeSlow(TRANSIENT_BUFFER_BYTES)) : undefined;
    const src = new ByteSource(fh, buffer);
    await checkMagic(src, path);
    let tensor: string | undefined;
    for (let ordinal = 0; ; ordinal++) {
      signal?.throwIfAborted();
      const at = src.offset;
      const lengthBytes = await src.take(RECORD_LENGTH_BYTES);
      if (lengthBytes === undefined) {
        throw new TruncatedError(
          `file ends at byte ${at + src.available} without its end marker (after ${ordinal} records)`,
          { file: path, tensor },
        );
      }
      const length = new DataView(lengthBytes.buffer, lengthBytes.byteOffset, RECORD_LENGTH_BYTES).getUint32(0, true);
      if (length === 0) {
        if (ordinal === 0) throw new FormatError('no records: a delta file starts with a DeltaHeader', { file: path });
        if ((await src.take(1)) !== undefined) {
          throw new FormatError(`data after the end marker at byte ${at}`, { file: path });
        }
        return;
      }
      if (length > maxRecordBytes) {
        throw new FormatError(
          `record ${ordinal} at byte ${at} is ${length} bytes, over the ${maxRecordBytes}-byte limit`,
          {
            file: path,
            tensor,
          },
        );
      }
      // In memory of its own unless transient: the record's bytes fields are views of what it is decoded
      // from, and the source reuses its buffer for the next records. With room before it to send it as an
      // UploadRequest.
      const own = transient ? await src.take(length) : await src.takeOwn(length, SOLE_FIELD_HEADROOM);
      if (own === undefined) {
        throw new TruncatedError(
          `record ${ordinal} at byte ${at} is cut off: ${src.available} of its ${length} bytes present`,
          { file: path, tensor },
        );
      }
      let record: DeltaRecord;
      try {
        record = DeltaRecord.decode(own);
      } catch (cause) {
        throw new FormatError(`record ${ordinal} at byte ${at} is not a valid DeltaRecord`, {
          file: path,
          tensor,
          cause,
        });
      }
      checkRecordPlace(record, ordinal, { file: path, tensor: recordTensor(record) ?? tensor });
      tensor = tensorAfter(tensor, record);
      if (!transient) rememberEncoding(record, own, SOLE_FIELD_HEADROOM);
      yield record;
    }
  } finally {
    await fh.close();
    if (buffer !== undefined && freeBuffers.length < MAX_FREE_BUFFERS) freeBuffers.push(buffer);
  }
}

async function checkMagic(src: ByteSource, path: string): Promise<void> {
  const n = DELTA_FILE_MAGIC.length;
  const magic = await src.take(n);
  if (magic === undefined) {
    // Peek at what is there: a cut-off magic is a truncation, anything else is not a delta file.
    const fh = await open(path, 'r');
    try {
      const head = Buffer.alloc(n);
      const { bytesRead } = await fh.read(head, 0, n, 0);
      if (Buffer.compare(head.subarray(0, bytesRead), Buffer.from(DELTA_FILE_MAGIC.subarray(0, bytesRead))) === 0) {
        throw new TruncatedError(`file is ${bytesRead} bytes, shorter than the ${n}-byte magic`, { file: path });
      }
    } finally {
      await fh.close();
    }
    throw new FormatError('not a .dppa file (wrong magic)', { file: path });
  }
  if (Buffer.compare(Buffer.from(magic.subarray(0, 4)), Buffer.from(DELTA_FILE_MAGIC.subarray(0, 4))) !== 0) {
    throw new FormatError('not a .dppa file (wrong magic)', { file: path });
  }
  if (magic[5] !== DELTA_FILE_MAGIC[5]) {
    throw new FormatError(
      `container version ${magic[5]} is not supported (this reader handles ${DELTA_FILE_MAGIC[5]})`,
      {
        file: path,
      },
    );
  }
  if (Buffer.compare(Buffer.from(magic), Buffer.from(DELTA_FILE_MAGIC)) !== 0) {
    throw new FormatError('not a .dppa file or damaged by a line-ending conversion (wrong magic)', { file: path });
  }
}

/**
 * Reads the header of a `.dppa` file, without reading further.
 *
 * @param path - The file.
 * @param opts - Abort signal and record size limit.
 * @returns The DeltaHeader.
 * @throws As {@link readDeltaFile} for the magic and first record.
 */
export async function readDeltaHeader(path: string, opts: ReadDeltaOptions = {}): Promise<DeltaHeader> {
  for await (const record of readDeltaFile(path, opts)) {
    // readDeltaFile guarantees the first record is a header.
    return record.header!;
  }
  throw new FormatError('no records', { file: path });
}

/** One item of {@link readDeltaTensors}: the header first, then each tensor. */
export type DeltaFileItem = { kind: 'header'; header: DeltaHeader } | { kind: 'tensor'; tensor: AssembledTensor };

/**
 * Reads a `.dppa` file tensor by tensor, every tensor checked by
 * {@link TensorAssembler} and against the header's plan: tensors appear in the
 * plan's order (those planned as sent), with the planned shape, each once, and
 * all of them before the end.
 *
 * Holds one tensor's entries at a time.
 *
 * @param path - The file.
 * @param opts - Abort signal and record size limit.
 * @returns A generator of the header, then the tensors.
 * @throws As {@link readDeltaFile}; FormatError / ChecksumError / TruncatedError from
 *   {@link TensorAssembler}; FormatError (naming the file and tensor) when a tensor is
 *   not the next planned one, has another shape, or planned tensors are missing.
 */
export async function* readDeltaTensors(
  path: string,
  opts: ReadDeltaOptions = {},
): AsyncGenerator<DeltaFileItem, void, undefined> {
  let planned: { name: string; shape: bigint[] }[] = [];
  let next = 0;
  let assembler: TensorAssembler | undefined;
  for await (const record of readDeltaFile(path, opts)) {
    if (record.header !== undefined) {
      planned = record.header.tensors.filter((t) => t.sent);
      yield { kind: 'header', header: record.header };
      continue;
    }
    if (record.tensorBegin !== undefined) {
      const { name, shape } = record.tensorBegin;
      if (assembler !== undefined) {
        throw new FormatError(`tensor begins before tensor "${assembler.name}" ended`, { file: path, tensor: name });
      }
      const plan = planned[next];
      if (plan === undefined || plan.name !== name) {
        const expected = plan === undefined ? 'no further tensor' : `tensor "${plan.name}"`;
        throw new FormatError(`not the next planned tensor (the header plans ${expected} next)`, {
          file: path,
          tensor: name,
        });
      }
      if (plan.shape.length !== shape.length || plan.shape.some((d, i) => d !== shape[i])) {
        throw new FormatError(`shape [${shape.join(', ')}] differs from the planned [${plan.shape.join(', ')}]`, {
          file: path,
          tensor: name,
        });
      }
      next++;
      assembler = new TensorAssembler({ file: path });
    }
    if (assembler === undefined) {
      throw new FormatError(`${record.chunk !== undefined ? 'chunk' : 'tensor end'} outside a tensor`, {
        file: path,
        tensor: recordTensor(record),
      });
    }
    assembler.push(record);
    if (assembler.complete) {
      const tensor = assembler.result();
      assembler = undefined;
      yield { kind: 'tensor', tensor };
    }
  }
  if (assembler !== undefined) {
    throw new FormatError('file ends inside the tensor', { file: path, tensor: assembler.name });
  }
  if (next < planned.length) {
    throw new FormatError(`${planned.length - next} planned tensors missing, first "${planned[next]!.name}"`, {
      file: path,
    });
  }
}
