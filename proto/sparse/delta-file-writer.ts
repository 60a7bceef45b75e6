/**
 * Writing `.dppa` files: atomically (a temporary name until complete, then a
 * rename) so a crash or error never leaves a partial file under the final
 * name, and with bounded buffering so a producer faster than the disk waits.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { DeltaRecord } from '../gen/dppa/v1/sparse.js';
import { FormatError } from '../errors.js';
import { syncFolder } from '../fs-sync.js';
import {
  checkRecordPlace,
  DEFAULT_MAX_RECORD_BYTES,
  DELTA_FILE_MAGIC,
  RECORD_LENGTH_BYTES,
  recordTensor,
  tensorAfter,
} from './delta-format.js';

/** Options of {@link DeltaFileWriter.create}. */
export interface DeltaFileWriterOptions {
  /** Largest encoded record accepted. @default 16 MiB ({@link DEFAULT_MAX_RECORD_BYTES}) */
  maxRecordBytes?: number | undefined;
  /** Bytes buffered before {@link DeltaFileWriter.write} waits for the disk. @default 1 MiB */
  highWaterMark?: number | undefined;
}

type WriterState = 'open' | 'closing' | 'closed' | 'aborted';

/**
 * Writes the records of one delta to a `.dppa` file.
 *
 * Records go to `<path>.tmp-<random>`; {@link DeltaFileWriter.close} writes the
 * end marker, fsyncs, and renames the file to `path`. Until then, and after
 * {@link DeltaFileWriter.abort} or any failure, nothing exists under `path`
 * (an existing file there is left untouched until the rename replaces it).
 */
export class DeltaFileWriter {
  /** Final path of the file. */
  readonly path: string;
  /** Temporary path written until {@link DeltaFileWriter.close}. */
  readonly tempPath: string;
  private fh: FileHandle | undefined;
  private readonly maxRecordBytes: number;
  private readonly highWaterMark: number;
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  /** Serialises flushes; never rejects (failures are kept in `failure`). */
  private flushing: Promise<void> = Promise.resolve();
  private failure: Error | undefined;
  private state: WriterState = 'open';
  private records = 0;
  private tensor: string | undefined;

  private constructor(path: string, tempPath: string, fh: FileHandle, opts: DeltaFileWriterOptions) {
    this.path = path;
    this.tempPath = tempPath;
    this.fh = fh;
    this.maxRecordBytes = opts.maxRecordBytes ?? DEFAULT_MAX_RECORD_BYTES;
    this.highWaterMark = opts.highWaterMark ?? 1024 * 1024;
    this.enqueue(DELTA_FILE_MAGIC);
  }

  /**
   * Starts a file that will appear at `path` once closed.
   *
   * @param path - Final path.
   * @param opts - Record size limit and buffering.
   * @returns The writer, with the temporary file created.
   * @throws Error from the file system if the temporary file cannot be created.
   */
  static async create(path: string, opts: DeltaFileWriterOptions = {}): Promise<DeltaFileWriter> {
    const tempPath = `${path}.tmp-${randomBytes(6).toString('hex')}`;
    // 'wx': never write into a file someone else created under the same name.
    const fh = await open(tempPath, 'wx');
    return new DeltaFileWriter(path, tempPath, fh, opts);
  }

  /**
   * Appends a record. Buffered: resolves at once unless the buffer is over its
   * high-water mark, then once it has been written out.
   *
   * A rejected record (rule broken, too large) is not written and leaves the
   * writer usable; an I/O failure aborts the writer.
   *
   * @param record - Exactly one of header / tensorBegin / chunk / tensorEnd set; the first record a header.
   * @param encoded - The record's protobuf encoding when the caller has it (a record as received),
   *   written as it is instead of encoding `record` again; it must decode to `record`.
   * @throws FormatError (naming the file and tensor) when the record breaks a container rule or
   *   encodes to more than `maxRecordBytes`.
   * @throws Error when the writer is closed or aborted, or from the file system.
   */
  async write(record: DeltaRecord, encoded?: Uint8Array): Promise<void> {
    this.assertOpen();
    const where = { file: this.path, tensor: recordTensor(record) ?? this.tensor };
    checkRecordPlace(record, this.records, where);
    const bytes = encoded ?? DeltaRecord.encode(record).finish();
    if (bytes.length > this.maxRecordBytes) {
      throw new FormatError(
        `record ${this.records} encodes to ${bytes.length} bytes, over the ${this.maxRecordBytes}-byte limit`,
        where,
      );
    }
    const length = new Uint8Array(RECORD_LENGTH_BYTES);
    new DataView(length.buffer).setUint32(0, bytes.length, true);
    this.enqueue(length);
    this.enqueue(bytes);
    this.records++;
    this.tensor = tensorAfter(this.tensor, record);
    if (this.pendingBytes >= this.highWaterMark) await this.flush();
  }

  /**
   * Finishes the file: end marker, fsync, rename to the final path, fsync of
   * the folder. Calling it again after success does nothing.
   *
   * @throws FormatError when no record was written (a file must start with a header);
   *   the writer is then aborted.
   * @throws Error from the file system; the writer is then aborted and nothing is left at `path`.
   */
  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.assertOpen();
    this.state = 'closing';
    try {
      if (this.records === 0) {
        throw new FormatError('no record written; a delta file starts with a DeltaHeader', { file: this.path });
      }
      this.enqueue(new Uint8Array(RECORD_LENGTH_BYTES));
      await this.flush();
      const fh = this.fh!;
      await fh.sync();
      this.fh = undefined;
      await fh.close();
      await rename(this.tempPath, this.path);
    } catch (err) {
      this.state = 'open';
      await this.abort();
      throw err;
    }
    this.state = 'closed';
    await syncFolder(dirname(this.path));
  }

  /**
   * Discards the file: closes it and removes the temporary file. Safe to call
   * more than once and after a failure; does nothing after a successful close.
   */
  async abort(): Promise<void> {
    if (this.state === 'closed' || this.state === 'aborted') return;
    this.state = 'aborted';
    this.pending = [];
    this.pendingBytes = 0;
    await this.flushing;
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close().catch(() => undefined);
    await rm(this.tempPath, { force: true });
  }

  private assertOpen(): void {
    if (this.state === 'open') return;
    const why = this.failure === undefined ? this.state : `aborted after an error`;
    throw new Error(`${this.path}: delta file writer is ${why}`, { cause: this.failure });
  }

  private enqueue(bytes: Uint8Array): void {
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
  }

  /** Writes out everything enqueued so far, after any flush already running. */
  private flush(): Promise<void> {
    const run = this.flushing.then(async () => {
      if (this.failure !== undefined) throw this.failure;
      const data = this.pending;
      const total = this.pendingBytes;
      this.pending = [];
      this.pendingBytes = 0;
      if (this.fh === undefined) return;
      // writev: the records go out as they are, without being copied into one buffer first.
      const { bytesWritten } = await this.fh.writev(data);
      if (bytesWritten < total) await writeRest(this.fh, data, bytesWritten);
    });
    this.flushing = run.catch((err: unknown) => {
      this.failure ??= err instanceof Error ? err : new Error(String(err));
    });
    return run.catch(async (err: unknown) => {
      if (this.state === 'open') await this.abort();
      throw err;
    });
  }
}

/** Writes what a short writev left, from byte `skip` of the concatenated buffers on. */
async function writeRest(fh: FileHandle, buffers: readonly Uint8Array[], skip: number): Promise<void> {
  const rest = Buffer.concat(buffers).subarray(skip);
  for (let done = 0; done < rest.length;) {
    const { bytesWritten } = await fh.write(rest, done, rest.length - done, null);
    done += bytesWritten;
  }
}
