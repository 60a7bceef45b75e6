/**
 * A party's support as upload records (positions only, value dtype NONE), from its `.dppa` delta: one partition
 * level (the target rate), each linear tensor's kept positions in partition 1, so that the server learns which
 * positions were kept but not their importance rank; outside tensors in partition 0.
 */
import { TensorKind, ValueDtype, type DeltaHeader, type DeltaRecord } from '../../proto/gen/dppa/v1/sparse.js';
import { readDeltaHeader, tensorRecords } from '../../proto/sparse/index.js';
import { scaledTensors } from './scaled-delta.js';

/** The header of the support upload of a delta with header `h`. */
export function supportHeader(h: DeltaHeader): DeltaHeader {
  return {
    ...h,
    levels: [h.rate],
    valueDtype: ValueDtype.VALUE_DTYPE_NONE,
    tensors: h.tensors.map((t) => ({ ...t, levelRates: t.levelRates.length === 0 ? [] : [t.levelRates.at(-1)!] })),
  };
}

/** The support's records of `delta` (header first, then each tensor), the tensors in `skip` left out. */
export async function* supportRecords(
  delta: string,
  skip: ReadonlySet<string> = new Set(),
  signal?: AbortSignal,
): AsyncGenerator<DeltaRecord, void, undefined> {
  const header = await readDeltaHeader(delta, signal === undefined ? {} : { signal });
  yield { header: supportHeader(header) };
  const kinds = new Map(header.tensors.map((t) => [t.name, t.kind]));
  const none = new Float32Array(0);
  for await (const t of scaledTensors(delta, { factors: header.levels.map(() => 1) }, signal)) {
    if (skip.has(t.name)) continue;
    const all = { positions: t.positions, values: none };
    const empty = { positions: new Float64Array(0), values: none };
    const partitions = kinds.get(t.name) === TensorKind.TENSOR_KIND_LINEAR ? [empty, all] : [all];
    yield* tensorRecords(t.name, t.shape, partitions, { valueDtype: ValueDtype.VALUE_DTYPE_NONE });
  }
}
