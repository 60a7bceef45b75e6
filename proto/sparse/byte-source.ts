/**
 * Sequential reads of exact byte counts from a file through one reusable
 * buffer, so that reading a file of any size holds at most the buffer and one
 * record in memory.
 */
import type { FileHandle } from 'node:fs/promises';

/** Buffer size used when none is given. */
export const DEFAULT_SOURCE_BUFFER_BYTES = 1024 * 1024;

/** Reads a file front to back in pieces of exact sizes. */
export class ByteSource {
  private readonly fh: FileHandle;
  private readonly buf: Buffer;
  private start = 0;
  private end = 0;
  private filePos = 0;
  private eof = false;
  private consumed = 0;
  private short = 0;

  /**
   * @param fh - Open file, read from offset 0.
   * @param buffer - The reusable buffer, or its size. @default {@link DEFAULT_SOURCE_BUFFER_BYTES}
   */
  constructor(fh: FileHandle, buffer: number | Buffer = DEFAULT_SOURCE_BUFFER_BYTES) {
    this.fh = fh;
    this.buf = typeof buffer === 'number' ? Buffer.allocUnsafe(buffer) : buffer;
  }

  /** Bytes handed out so far: the file offset of the next {@link ByteSource.take}. */
  get offset(): number {
    return this.consumed;
  }

  /** After a {@link ByteSource.take} that hit the end: how many of the wanted bytes the file still had. */
  get available(): number {
    return this.short;
  }

  /**
   * The next `n` bytes.
   *
   * @param n - Byte count.
   * @returns The bytes, or undefined when the file ends first (see {@link ByteSource.available}).
   *   A returned view is valid only until the next call.
   */
  async take(n: number): Promise<Uint8Array | undefined> {
    if (this.end - this.start < n) {
      if (n > this.buf.length) return this.takeOwn(n);
      if (!(await this.fill(n))) {
        this.short = this.end - this.start;
        return undefined;
      }
    }
    const out = this.buf.subarray(this.start, this.start + n);
    this.start += n;
    this.consumed += n;
    return out;
  }

  /** Reads until `n` bytes are buffered or the file ends; true if there are `n`. */
  private async fill(n: number): Promise<boolean> {
    this.buf.copyWithin(0, this.start, this.end);
    this.end -= this.start;
    this.start = 0;
    while (this.end < n && !this.eof) {
      const { bytesRead } = await this.fh.read(this.buf, this.end, this.buf.length - this.end, this.filePos);
      if (bytesRead === 0) this.eof = true;
      this.end += bytesRead;
      this.filePos += bytesRead;
    }
    return this.end >= n;
  }

  /**
   * The next `n` bytes in memory of their own, which later calls leave
   * alone: the part already buffered is copied there, the rest is read
   * straight into it (so a large piece is copied once, by the kernel).
   *
   * @param n - Byte count.
   * @param headroom - Spare bytes left before them in their ArrayBuffer, for the caller to
   *   put a prefix there without copying them. @default 0
   * @returns The bytes, a view starting `headroom` bytes into an ArrayBuffer of
   *   `headroom + n` bytes; or undefined when the file ends first (see {@link ByteSource.available}).
   */
  async takeOwn(n: number, headroom = 0): Promise<Uint8Array | undefined> {
    const mem = Buffer.allocUnsafeSlow(headroom + n);
    const out = new Uint8Array(mem.buffer, mem.byteOffset + headroom, n);
    let have = Math.min(n, this.end - this.start);
    out.set(this.buf.subarray(this.start, this.start + have));
    this.start += have;
    while (have < n && !this.eof) {
      const { bytesRead } = await this.fh.read(out, have, n - have, this.filePos);
      if (bytesRead === 0) this.eof = true;
      have += bytesRead;
      this.filePos += bytesRead;
    }
    if (have < n) {
      this.short = have;
      return undefined;
    }
    this.consumed += n;
    return out;
  }
}
