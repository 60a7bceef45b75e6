/**
 * Element types of safetensors checkpoints and conversions between them, on integer views without per-element
 * allocation; little-endian hosts only. Rounding rules: docs/design/safetensors.md.
 */

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error('proto/safetensors/dtype: big-endian hosts are not supported');
}

/** An element type this project reads and writes. */
export type Dtype = 'F32' | 'F16' | 'BF16';

/** Every supported dtype, in a fixed order. */
export const DTYPES: readonly Dtype[] = ['F32', 'F16', 'BF16'];

/** True if `s` is the safetensors name of a supported dtype. */
export function isDtype(s: unknown): s is Dtype {
  return s === 'F32' || s === 'F16' || s === 'BF16';
}

/** Size in bytes of one element of `dtype`. */
export function bytesPerElement(dtype: Dtype): 2 | 4 {
  return dtype === 'F32' ? 4 : 2;
}

function checkDst(n: number, dst: { length: number } | undefined): void {
  if (dst !== undefined && dst.length < n) {
    throw new RangeError(`destination holds ${dst.length} elements, ${n} needed`);
  }
}

/**
 * Reinterprets a float array's memory as 32-bit words. Signed on purpose:
 * V8 keeps int32 values in integer registers, while a uint32 above 2^31 is
 * handled as a double, which made these loops 2x slower.
 */
function wordsOf(a: Float32Array): Int32Array {
  return new Int32Array(a.buffer, a.byteOffset, a.length);
}

// The loops below are unrolled by 4: with arrays passed as arguments V8
// re-checks bounds and reloads backing-store pointers every iteration, and
// unrolling amortises that (measured ~1.7x on 8M elements).

/**
 * Widens BF16 bit patterns to F32 (exact: BF16 is the top half of an F32).
 *
 * `dst` may share memory with `src` only if `src` starts at least
 * `2 * src.length` bytes after `dst` (i.e. the raw data sits in the upper
 * half of the output buffer): writes then never overtake unread input, so a
 * tensor can be widened in place without a second buffer.
 * @param src BF16 bit patterns.
 * @param dst Where to write; @default a new Float32Array of `src.length`.
 * @returns `dst`, filled with `src.length` values.
 * @throws RangeError if `dst` is shorter than `src`.
 */
export function bf16ToF32(src: Uint16Array, dst?: Float32Array): Float32Array {
  const n = src.length;
  checkDst(n, dst);
  const out = dst ?? new Float32Array(n);
  const w = wordsOf(out);
  const m = n & ~3;
  let i = 0;
  for (; i < m; i += 4) {
    w[i] = src[i]! << 16;
    w[i + 1] = src[i + 1]! << 16;
    w[i + 2] = src[i + 2]! << 16;
    w[i + 3] = src[i + 3]! << 16;
  }
  for (; i < n; i++) w[i] = src[i]! << 16;
  return out;
}

/**
 * Narrows F32 values to BF16 bit patterns, rounding to nearest, ties to even.
 * @param src F32 values.
 * @param dst Where to write; @default a new Uint16Array of `src.length`.
 * @returns `dst`, filled with `src.length` BF16 bit patterns.
 * @throws RangeError if `dst` is shorter than `src`.
 */
export function f32ToBf16(src: Float32Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  checkDst(n, dst);
  const out = dst ?? new Uint16Array(n);
  const w = wordsOf(src);
  const m = n & ~3;
  let i = 0;
  for (; i < m; i += 4) {
    out[i] = floatBitsToBf16Bits(w[i]!);
    out[i + 1] = floatBitsToBf16Bits(w[i + 1]!);
    out[i + 2] = floatBitsToBf16Bits(w[i + 2]!);
    out[i + 3] = floatBitsToBf16Bits(w[i + 3]!);
  }
  for (; i < n; i++) out[i] = floatBitsToBf16Bits(w[i]!);
  return out;
}

/** BF16 bit pattern nearest (ties to even) to the F32 bit pattern `x` (as int32). */
function floatBitsToBf16Bits(x: number): number {
  // Plain rounding could carry a NaN payload into the exponent or drop every
  // payload bit (making an infinity); keep sign and top bits, set quiet.
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) | 0x0040) & 0xffff;
  // Adding 0x7fff (+1 when the kept LSB is odd) rounds half to even; an
  // overflow carries into the exponent and correctly yields infinity. `| 0`
  // keeps the sum in int32 (wrapping is harmless: only the bits matter).
  return ((x + 0x7fff + ((x >>> 16) & 1)) | 0) >>> 16;
}

/** F32 bit pattern of the F16 bit pattern `h` (exact). */
function halfBitsToFloatBits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  let mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0;
  if (exp !== 0) return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
  if (mant === 0) return sign >>> 0;
  // Subnormal: shift the leading one up into the implicit-bit position.
  let e = 113;
  while ((mant & 0x400) === 0) {
    mant <<= 1;
    e--;
  }
  return (sign | (e << 23) | ((mant & 0x3ff) << 13)) >>> 0;
}

let halfTable: Int32Array | undefined;

/** All 65536 F16 → F32 results; a lookup beats branching on subnormals. */
function halfToFloatTable(): Int32Array {
  if (halfTable === undefined) {
    halfTable = new Int32Array(65536);
    for (let h = 0; h < 65536; h++) halfTable[h] = halfBitsToFloatBits(h);
  }
  return halfTable;
}

/**
 * Widens F16 bit patterns to F32 (exact, subnormals included).
 *
 * The same in-place overlap as {@link bf16ToF32} is allowed.
 * @param src F16 bit patterns.
 * @param dst Where to write; @default a new Float32Array of `src.length`.
 * @returns `dst`, filled with `src.length` values.
 * @throws RangeError if `dst` is shorter than `src`.
 */
export function f16ToF32(src: Uint16Array, dst?: Float32Array): Float32Array {
  const n = src.length;
  checkDst(n, dst);
  const out = dst ?? new Float32Array(n);
  const w = wordsOf(out);
  const table = halfToFloatTable();
  const m = n & ~3;
  let i = 0;
  for (; i < m; i += 4) {
    w[i] = table[src[i]!]!;
    w[i + 1] = table[src[i + 1]!]!;
    w[i + 2] = table[src[i + 2]!]!;
    w[i + 3] = table[src[i + 3]!]!;
  }
  for (; i < n; i++) w[i] = table[src[i]!]!;
  return out;
}

/**
 * Narrows F32 values to F16 bit patterns, rounding to nearest, ties to even,
 * with subnormal results and overflow to infinity.
 * @param src F32 values.
 * @param dst Where to write; @default a new Uint16Array of `src.length`.
 * @returns `dst`, filled with `src.length` F16 bit patterns.
 * @throws RangeError if `dst` is shorter than `src`.
 */
export function f32ToF16(src: Float32Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  checkDst(n, dst);
  const out = dst ?? new Uint16Array(n);
  const w = wordsOf(src);
  const m = n & ~3;
  let i = 0;
  for (; i < m; i += 4) {
    out[i] = floatBitsToHalfBits(w[i]!);
    out[i + 1] = floatBitsToHalfBits(w[i + 1]!);
    out[i + 2] = floatBitsToHalfBits(w[i + 2]!);
    out[i + 3] = floatBitsToHalfBits(w[i + 3]!);
  }
  for (; i < n; i++) out[i] = floatBitsToHalfBits(w[i]!);
  return out;
}

/** F16 bit pattern nearest (ties to even) to the F32 bit pattern `x` (as int32). */
function floatBitsToHalfBits(x: number): number {
  const abs = x & 0x7fffffff;
  // Kept tiny so V8 inlines it into the loop; the rare cases go out of line.
  if (abs >= 0x38800000 && abs < 0x477ff000) {
    // Normal in F16: rebias the exponent (127 → 15) and round 13 bits away.
    const m = abs - 0x38000000;
    return ((x >>> 16) & 0x8000) | ((m + 0xfff + ((m >>> 13) & 1)) >>> 13);
  }
  return floatBitsToHalfBitsRare(x);
}

/** {@link floatBitsToHalfBits} for zeros, subnormals, overflow, infinities and NaNs. */
function floatBitsToHalfBitsRare(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const abs = x & 0x7fffffff;
  if (abs >= 0x477ff000) {
    // 65520 is halfway between 65504 (odd mantissa) and 65536, so it and all
    // above round to infinity; NaNs keep the top payload bits and get quieted.
    if (abs > 0x7f800000) return sign | 0x7e00 | ((abs >>> 13) & 0x3ff);
    return sign | 0x7c00;
  }
  const e = abs >>> 23;
  // Below 2^-25 everything rounds to zero (2^-25 itself ties to the even 0).
  if (e < 102) return sign;
  // Subnormal: value / 2^-24 = significand * 2^(e - 126), rounded half to even.
  const sig = (abs & 0x7fffff) | 0x800000;
  const shift = 126 - e;
  const half = 1 << (shift - 1);
  const rem = sig & ((half << 1) - 1);
  let q = sig >>> shift;
  if (rem > half || (rem === half && (q & 1) === 1)) q++;
  return sign | q;
}

/** A view of `bytes` as 16- or 32-bit words, copying once if misaligned. */
function aligned(bytes: Uint8Array, size: 2 | 4): Uint8Array {
  if (bytes.byteLength % size !== 0) {
    throw new RangeError(`${bytes.byteLength} bytes is not a whole number of ${size}-byte elements`);
  }
  // Uint8Array's slice copies; a Buffer's own slice() would return a view, as misaligned as before.
  return bytes.byteOffset % size === 0 ? bytes : Uint8Array.prototype.slice.call(bytes);
}

/**
 * Decodes little-endian tensor bytes of `dtype` to F32 values.
 *
 * For F32 without `dst` the result is a view over the same memory as `bytes`
 * (no copy) when `bytes` is 4-byte aligned; otherwise it never aliases.
 * @param bytes Raw tensor data; any byteOffset is accepted (copied once if misaligned).
 * @param dtype The element type of `bytes`.
 * @param dst Where to write; @default a new Float32Array (or a view, see above).
 * @returns The decoded values.
 * @throws RangeError if the length is not a multiple of the element size or `dst` is too short.
 */
export function decodeToF32(bytes: Uint8Array, dtype: Dtype, dst?: Float32Array): Float32Array {
  const size = bytesPerElement(dtype);
  const b = aligned(bytes, size);
  const n = b.byteLength / size;
  if (dtype === 'F32') {
    const view = new Float32Array(b.buffer, b.byteOffset, n);
    if (dst === undefined) return view;
    checkDst(n, dst);
    dst.set(view);
    return dst;
  }
  const halves = new Uint16Array(b.buffer, b.byteOffset, n);
  return dtype === 'BF16' ? bf16ToF32(halves, dst) : f16ToF32(halves, dst);
}

/**
 * Encodes F32 values as little-endian tensor bytes of `dtype`.
 *
 * Without `dst`, for F32 the result is a view over the memory of `values` (no copy).
 * @param values The values to encode.
 * @param dtype The element type to produce; BF16 and F16 round to nearest, ties to even.
 * @param dst Where to write (its start must be 2-byte aligned for BF16/F16); the result is then
 *   its first bytes. Reusing one spares a fresh tensor-sized allocation and its page faults. For BF16/F16 it
 *   may be the memory of `values` itself, from the same start: the narrowing runs forward, so no element is
 *   overwritten before it is read. @default new memory (F32: a view of `values`)
 * @returns `values.length * bytesPerElement(dtype)` bytes.
 * @throws RangeError if `dst` is too short.
 */
export function encodeFromF32(values: Float32Array, dtype: Dtype, dst?: Uint8Array): Uint8Array {
  const byteLength = values.length * bytesPerElement(dtype);
  if (dst !== undefined && dst.byteLength < byteLength)
    throw new RangeError(`destination holds ${dst.byteLength} bytes, ${byteLength} needed`);
  if (dtype === 'F32') {
    const view = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
    if (dst === undefined) return view;
    dst.set(view);
    return dst.subarray(0, byteLength);
  }
  const into = dst === undefined ? undefined : new Uint16Array(dst.buffer, dst.byteOffset, values.length);
  const halves = dtype === 'BF16' ? f32ToBf16(values, into) : f32ToF16(values, into);
  return new Uint8Array(halves.buffer, halves.byteOffset, halves.byteLength);
}
