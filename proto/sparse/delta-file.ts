/**
 * The `.dppa` container: one party's delta on disk, as a stream of
 * length-prefixed DeltaRecord messages between a magic and an end marker
 * (layout: docs/formats.md).
 */
export {
  DEFAULT_MAX_RECORD_BYTES,
  DELTA_FILE_MAGIC,
  DELTA_FILE_VERSION,
  DELTA_FORMAT_VERSION,
  FINETUNED_FORMAT_VERSION,
  formatVersionOf,
  formatVersionProblem,
} from './delta-format.js';
export { DeltaFileWriter, type DeltaFileWriterOptions } from './delta-file-writer.js';
export {
  readDeltaFile,
  readDeltaHeader,
  readDeltaTensors,
  type DeltaFileItem,
  type ReadDeltaOptions,
} from './delta-file-reader.js';
