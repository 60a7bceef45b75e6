/**
 * The ONNX protobuf schema, as one import for this folder (through onnx-proto's default export).
 * See docs/design/onnx-evaluator.md.
 */
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';

/** The generated ONNX message classes (`onnx.ModelProto.decode`, …). */
export const onnx = onnxProto.onnx;

export type ModelProto = OnnxTypes.ModelProto;
export type IModelProto = OnnxTypes.IModelProto;
export type IGraphProto = OnnxTypes.IGraphProto;
export type ITensorProto = OnnxTypes.ITensorProto;
export type IValueInfoProto = OnnxTypes.IValueInfoProto;
export type INodeProto = OnnxTypes.INodeProto;

/** `TensorProto.DataType` values used here. */
export const DataType = onnx.TensorProto.DataType;

/** A protobuf int64 as decoded by protobufjs: a number, or a Long when the `long` package is present. */
export type Int64 = number | { toNumber(): number };

/**
 * Converts a decoded int64 (dims, offsets) to a JS number.
 * @throws RangeError if it is not a safe integer.
 */
export function int64(x: Int64 | null | undefined): number {
  const n = x == null ? 0 : typeof x === 'number' ? x : x.toNumber();
  if (!Number.isSafeInteger(n)) throw new RangeError(`int64 value ${n} is not a safe integer`);
  return n;
}

/** The name of a `TensorProto.DataType` value, for messages. */
export function dataTypeName(t: number | null | undefined): string {
  return (t != null && (onnx.TensorProto.DataType as unknown as Record<number, string>)[t]) || `data type ${String(t)}`;
}
