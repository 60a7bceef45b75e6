/**
 * Most-significant-bit-first bit streams over byte buffers, the carrier of the Golomb-coded position gaps; nothing
 * is allocated per call. See docs/design/position-coding.md.
 */

/** Widest field {@link BitWriter.write} and {@link BitReader.read} take in one call. */
export const MAX_FIELD_BITS = 24;

/**
 * Appends bit fields to a buffer of fixed capacity.
 *
 * The capacity is fixed up front because the encoder knows an exact upper bound
 * on its output; growing would cost a copy and a branch per byte.
 */
export class BitWriter {
  private readonly buf: Uint8Array;
  private pos = 0;
  /** Pending bits in the low `bits` positions; higher bits are stale and ignored. */
  private acc = 0;
  /** Always below 8 between calls: whole bytes are stored at once. */
  private bits = 0;

  /**
   * @param capacityBytes - Most bytes the stream will ever hold, padding included.
   */
  constructor(capacityBytes: number) {
    this.buf = new Uint8Array(capacityBytes);
  }

  /**
   * Appends the `n` low bits of `value`, most significant first.
   *
   * @param value - Non-negative integer below 2^n.
   * @param n - Field width, 0 to {@link MAX_FIELD_BITS}.
   */
  write(value: number, n: number): void {
    // bits < 8 and n <= 24 keep every pending bit inside the int32.
    const acc = (this.acc << n) | value;
    let bits = this.bits + n;
    while (bits >= 8) {
      bits -= 8;
      // A Uint8Array store keeps the low 8 bits, so no mask is needed.
      this.buf[this.pos++] = acc >>> bits;
    }
    this.acc = acc;
    this.bits = bits;
  }

  /**
   * Appends a field wider than {@link MAX_FIELD_BITS}, up to 31 bits.
   *
   * @param value - Non-negative integer below 2^n.
   * @param n - Field width, 0 to 31.
   */
  writeWide(value: number, n: number): void {
    if (n <= MAX_FIELD_BITS) {
      this.write(value, n);
    } else {
      this.write(Math.floor(value / 65536), n - 16);
      this.write(value & 0xffff, 16);
    }
  }

  /**
   * Appends `q` one bits and a terminating zero bit: the unary code of `q`.
   *
   * @param q - Non-negative integer; may be far beyond 32 (written in pieces).
   */
  writeUnary(q: number): void {
    while (q >= MAX_FIELD_BITS) {
      this.write(0xffffff, MAX_FIELD_BITS);
      q -= MAX_FIELD_BITS;
    }
    this.write(((1 << q) - 1) << 1, q + 1);
  }

  /**
   * Pads the last byte with zero bits and returns the bytes written.
   *
   * @returns A view of the writer's buffer (no copy).
   * @throws RangeError when more bytes were written than the capacity given,
   *   which means the caller's size bound was wrong.
   */
  finish(): Uint8Array {
    if (this.bits > 0) {
      this.buf[this.pos++] = this.acc << (8 - this.bits);
      this.bits = 0;
    }
    if (this.pos > this.buf.length) {
      throw new RangeError(`bit stream overflowed its ${this.buf.length}-byte buffer (${this.pos} bytes needed)`);
    }
    return this.buf.subarray(0, this.pos);
  }
}

/**
 * Reads bit fields from a byte buffer, most significant bit first.
 *
 * Reading past the end yields zero bits instead of failing, which keeps the
 * per-field path free of bounds checks; the caller compares
 * {@link BitReader.consumedBits} with {@link BitReader.totalBits} once at the
 * end to detect a truncated stream. Zeros also end any unary run, so a
 * truncated stream cannot make a read loop forever.
 */
export class BitReader {
  private readonly buf: Uint8Array;
  private pos = 0;
  /** The next `bits` bits, left-aligned; all lower bits are zero. */
  private acc = 0;
  private bits = 0;

  /** @param bytes - The stream; not copied, must not change while read. */
  constructor(bytes: Uint8Array) {
    this.buf = bytes;
  }

  /** Number of bits in the stream, padding included. */
  get totalBits(): number {
    return this.buf.length * 8;
  }

  /** Bits consumed so far; above {@link BitReader.totalBits} once the reader ran past the end. */
  get consumedBits(): number {
    return this.pos * 8 - this.bits;
  }

  /** Tops the window up to at least 25 bits, with zeros beyond the end of the buffer. */
  private refill(): void {
    let acc = this.acc;
    let bits = this.bits;
    const buf = this.buf;
    while (bits <= 24) {
      const byte = this.pos < buf.length ? buf[this.pos]! : 0;
      this.pos++;
      acc |= byte << (24 - bits);
      bits += 8;
    }
    this.acc = acc;
    this.bits = bits;
  }

  /**
   * Reads an `n`-bit field.
   *
   * @param n - Field width, 0 to {@link MAX_FIELD_BITS}.
   * @returns The field as a non-negative integer.
   */
  read(n: number): number {
    if (n === 0) return 0;
    if (this.bits < n) this.refill();
    const v = this.acc >>> (32 - n);
    this.acc <<= n;
    this.bits -= n;
    return v;
  }

  /**
   * Reads a field of up to 31 bits.
   *
   * @param n - Field width, 0 to 31.
   */
  readWide(n: number): number {
    if (n <= MAX_FIELD_BITS) return this.read(n);
    const hi = this.read(n - 16);
    return hi * 65536 + this.read(16);
  }

  /**
   * Reads a unary code: counts one bits up to and including a zero bit.
   *
   * @returns The number of one bits.
   */
  readUnary(): number {
    let q = 0;
    for (;;) {
      if (this.bits < 32) this.refill();
      // Bits below the window are zero, so the count never runs past it.
      const ones = Math.clz32(~this.acc);
      if (ones < this.bits) {
        // Two shifts: a shift by 32 would be a shift by 0 in JavaScript.
        this.acc = (this.acc << ones) << 1;
        this.bits -= ones + 1;
        return q + ones;
      }
      q += this.bits;
      this.acc = 0;
      this.bits = 0;
    }
  }

  /**
   * Whether every bit not yet consumed is zero, i.e. the rest is padding.
   * Does not consume anything visible to the caller.
   */
  restIsZero(): boolean {
    if (this.bits > 0 && this.acc !== 0) return false;
    for (let i = this.pos; i < this.buf.length; i++) if (this.buf[i] !== 0) return false;
    return true;
  }
}
