/**
 * Hugging Face safetensors checkpoints: reading by offset, atomic writing,
 * and F32/F16/BF16 conversions. See `reader.ts` and `writer.ts`.
 */

export {
  type Dtype,
  DTYPES,
  isDtype,
  bytesPerElement,
  bf16ToF32,
  f32ToBf16,
  f16ToF32,
  f32ToF16,
  decodeToF32,
  encodeFromF32,
} from './dtype.js';
export {
  type TensorInfo,
  type CheckpointLayout,
  type LayoutFile,
  type LayoutTensor,
  SINGLE_FILE_NAME,
  INDEX_FILE_NAME,
  numelOf,
  byteLengthOf,
} from './layout.js';
export { DEFAULT_MAX_HEADER_BYTES } from './header.js';
export { Checkpoint, type OpenCheckpointOptions, type ReadOptions, type ReadF32Options } from './reader.js';
export { CheckpointWriter, type CreateWriterOptions, type TensorSlot } from './writer.js';
export { SharedCheckpointWriter, type LayOutOptions } from './shared-writer.js';
export { writeCheckpoint, planLayout, type TensorData, type WriteCheckpointOptions } from './write-checkpoint.js';
