/**
 * Sparse delta format: position coding, chunk codec, tensor record sequences
 * and the `.dppa` file container. Layout of every byte: docs/formats.md.
 */
export { crc32c } from './chunk-checksum.js';
export { golombParameter, MAX_GOLOMB_M } from './golomb.js';
export { chunkChecksum, foldChunkCrc } from './chunk-checksum.js';
export {
  checkChunk,
  DEFAULT_MAX_CHUNK_ENTRIES,
  decodeChunk,
  encodeChunks,
  type CheckedChunk,
  type DecodeChunkContext,
  type DecodedChunk,
  type DecodeScratch,
  type EncodeChunksOptions,
} from './chunk-codec.js';
export { DEFAULT_VALUE_DTYPE, storageDtype } from './value-dtype.js';
export { DEFAULT_MAX_ABS_VALUE, firstValueBeyond, magnitudeLimit } from './value-bound.js';
export {
  shapeNumel,
  tensorRecords,
  TensorRecordStream,
  type PartitionEntries,
  type TensorRecordOptions,
} from './tensor-records.js';
export {
  assembleTensor,
  TensorAssembler,
  type AssembledTensor,
  type TensorAssemblerOptions,
} from './tensor-assembler.js';
export * from './delta-file.js';
export { addChunkScaled, addScaled } from './add-scaled.js';
export { carriesFinetuned, FinetunedToDelta } from './finetuned-delta.js';
export { encodeSoleField, encodingOf, rememberEncoding, SOLE_FIELD_HEADROOM } from './record-encoding.js';
