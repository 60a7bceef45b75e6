/**
 * The precisions in which kept delta values travel, rounded by the same conversions as checkpoints.
 * See docs/design/sparse-chunks.md.
 */
import { ValueDtype } from '../gen/dppa/v1/sparse.js';
import { bytesPerElement, decodeToF32, encodeFromF32, type Dtype } from '../safetensors/dtype.js';

/** Value precision used when none is given. */
export const DEFAULT_VALUE_DTYPE = ValueDtype.VALUE_DTYPE_BF16;

/**
 * The storage dtype of a value precision.
 *
 * @param v - Precision from a chunk or header; UNSPECIFIED means the default, BF16.
 * @returns The dtype, or undefined when `v` is not a precision this version knows.
 */
export function storageDtype(v: ValueDtype): Dtype | undefined {
  switch (v) {
    case ValueDtype.VALUE_DTYPE_UNSPECIFIED:
    case ValueDtype.VALUE_DTYPE_BF16:
      return 'BF16';
    case ValueDtype.VALUE_DTYPE_F16:
      return 'F16';
    case ValueDtype.VALUE_DTYPE_F32:
      return 'F32';
    default:
      return undefined;
  }
}

/**
 * Bytes per value of a known precision.
 *
 * @param dtype - A storage dtype from {@link storageDtype}.
 */
export function valueSize(dtype: Dtype): number {
  return bytesPerElement(dtype);
}

/**
 * Encodes values little-endian in `dtype`, rounding to nearest, ties to even.
 *
 * @param values - The values; never aliased by the result, so the caller may reuse its array.
 * @param dtype - Storage dtype.
 * @returns A Buffer of exactly `values.length · valueSize(dtype)` bytes.
 */
export function encodeValues(values: Float32Array, dtype: Dtype): Buffer {
  const bytes = encodeFromF32(values, dtype);
  // F32 comes back as a view of the caller's memory; a chunk must not change with it.
  return dtype === 'F32' ? Buffer.from(bytes) : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Decodes little-endian values of `dtype` into `dst` (never a view of `bytes`).
 *
 * @param bytes - Exactly `dst.length · valueSize(dtype)` bytes.
 * @param dtype - Storage dtype.
 * @param dst - Receives the values.
 */
export function decodeValues(bytes: Uint8Array, dtype: Dtype, dst: Float32Array): void {
  decodeToF32(bytes, dtype, dst);
}
