/** Summary of a `.dppa` file: its header, and per tensor its rates, kept counts and size. */
import { stat } from 'node:fs/promises';
import { outsidePolicyFromWire, pruneMethodFromWire } from '../proto/algorithm/index.js';
import { FormatError } from '../proto/errors.js';
import { TensorKind, ValueDtype, ValueKind } from '../proto/gen/dppa/v1/sparse.js';
import { readDeltaFile, readDeltaHeader, TensorAssembler } from '../proto/sparse/index.js';

/** One tensor of a delta as {@link inspectDelta} reports it. */
export interface TensorSummary {
  name: string;
  kind: 'linear' | 'outside';
  /** Model layer, -1 when none. */
  layer: number;
  shape: number[];
  numel: number;
  /** Pruning rate at each level; the last is the target's. */
  levelRates: number[];
  /** False when the tensor was not sent (outside policy `skip`). */
  sent: boolean;
  /** Kept entries per partition, index 0 for partition 0 (outside tensors). */
  keptPerPartition: number[];
  /** Bytes of chunk payload (positions and values). */
  bytes: number;
}

/** What a `.dppa` file holds. */
export interface DeltaSummary {
  file: string;
  fileBytes: number;
  baseFingerprint: string;
  /** The pruning method (the `prune_method` enum, else an older writer's text); '' when neither is set. */
  method: string;
  /** The outside policy (the `outside` enum, else `options.outside`); '' when neither is set. */
  outside: string;
  rate: number;
  levels: number[];
  options: Record<string, string>;
  valueDtype: string;
  /** What the values are: 'delta', 'finetuned' (the fine-tuned weights, format version 2) or 'merged' (a merged patch). */
  valueKind: string;
  producer: string;
  tensors: TensorSummary[];
}

const KIND_NAMES: Record<number, string> = {
  [ValueKind.VALUE_KIND_UNSPECIFIED]: 'delta',
  [ValueKind.VALUE_KIND_FINETUNED]: 'finetuned',
  [ValueKind.VALUE_KIND_MERGED]: 'merged',
};

const DTYPE_NAMES: Record<number, string> = {
  [ValueDtype.VALUE_DTYPE_BF16]: 'bf16',
  [ValueDtype.VALUE_DTYPE_F16]: 'f16',
  [ValueDtype.VALUE_DTYPE_F32]: 'f32',
};

/**
 * Reads a whole `.dppa` file, checking every chunk, and summarises it.
 * @throws FormatError / ChecksumError / TruncatedError naming the file and tensor.
 */
export async function inspectDelta(file: string, opts: { signal?: AbortSignal } = {}): Promise<DeltaSummary> {
  const header = await readDeltaHeader(file, opts);
  const tensors = new Map<string, TensorSummary>(
    header.tensors.map((t) => [
      t.name,
      {
        name: t.name,
        kind: t.kind === TensorKind.TENSOR_KIND_LINEAR ? 'linear' : 'outside',
        layer: t.layer,
        shape: t.shape.map(Number),
        numel: t.shape.reduce((a, d) => a * Number(d), 1),
        levelRates: t.levelRates,
        sent: t.sent,
        keptPerPartition: [],
        bytes: 0,
      },
    ]),
  );
  let assembler: TensorAssembler | undefined;
  let current: TensorSummary | undefined;
  for await (const record of readDeltaFile(file, opts)) {
    if (record.header !== undefined) continue;
    if (record.tensorBegin !== undefined) {
      current = tensors.get(record.tensorBegin.name);
      if (current === undefined)
        throw new FormatError('tensor is not in the header', { file, tensor: record.tensorBegin.name });
      assembler = new TensorAssembler({ file, entries: 'stream' });
    }
    if (assembler === undefined || current === undefined)
      throw new FormatError('a record comes before any tensor begins', { file });
    assembler.push(record);
    if (record.chunk !== undefined) current.bytes += record.chunk.positions.length + record.chunk.values.length;
    if (assembler.complete) {
      current.keptPerPartition = assembler.result().keptPerPartition;
      assembler = undefined;
    }
  }
  return {
    file,
    fileBytes: (await stat(file)).size,
    baseFingerprint: header.baseFingerprint,
    method: shown(() => pruneMethodFromWire(header.pruneMethod, header.method)),
    outside: shown(() => outsidePolicyFromWire(header.outside, header.options['outside'] ?? '')),
    rate: header.rate,
    levels: header.levels,
    options: header.options,
    valueDtype: DTYPE_NAMES[header.valueDtype] ?? `unknown (${header.valueDtype})`,
    valueKind: KIND_NAMES[header.valueKind] ?? `unknown (${header.valueKind})`,
    producer: header.producer,
    tensors: [...tensors.values()],
  };
}

/** A setting read from the header, as shown: its word, '' when unset, or the refusal when unknown or contradictory. */
function shown(read: () => string | undefined): string {
  try {
    return read() ?? '';
  } catch (err) {
    if (err instanceof RangeError) return `unreadable (${err.message})`;
    throw err;
  }
}
