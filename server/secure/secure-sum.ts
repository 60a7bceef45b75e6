/**
 * Unmasking a secure job: the survivors' spooled masked vectors are read tensor range by tensor range, summed,
 * cleared of their masks, decoded, and written as one-tensor `.dppa` files of F32 values (`<job>/secure/sum/`),
 * which the merge adds to the base as the one contribution of the job (merge-parties.ts).
 */
import { readFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { OutsidePolicy, PruneMethod } from '../../proto/gen/dppa/v1/algorithm.js';
import { TensorKind, ValueDtype, ValueKind, type DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { addInto, decodeSum, removeMasks, type FixedPoint, type MaskRemoval } from '../../proto/secure/index.js';
import { exists } from '../../proto/safetensors/fs-util.js';
import {
  DEFAULT_MAX_CHUNK_ENTRIES,
  DELTA_FORMAT_VERSION,
  DeltaFileWriter,
  TensorRecordStream,
} from '../../proto/sparse/index.js';
import { discardedMark, readMasked, secureDataDiscarded, secureDir } from '../uploads/masked-spool.js';
import { writeFileDurably } from '../durable-write.js';
import { unionPositions, type Union } from './union.js';

/** Words unmasked at a time: 4 whole chunks of the default size, so that the ranges' chunks are one pass's. */
const RANGE_WORDS = 4 * DEFAULT_MAX_CHUNK_ENTRIES;

/** Folder of the unmasked sum's tensor files. */
export function sumDir(jobDir: string): string {
  return join(secureDir(jobDir), 'sum');
}

/**
 * Deletes a job's masked vectors, unmasked sum (the sum at a position only one party kept is that party's
 * value) and union U (`union.bin`/`union.json`, 4 bytes a position): called once the job merged or failed, whatever
 * `--keep-uploads` says. The mark `secure/discarded` is written first: a masked upload still open (on this server or another replica) writes nothing after it.
 * @returns True when there was something to delete.
 */
export async function discardSecureData(jobDir: string): Promise<boolean> {
  // Written once (at every start, and on a redelivered commit, the job's data may be discarded again).
  if (!(await secureDataDiscarded(jobDir))) {
    await mkdir(secureDir(jobDir), { recursive: true });
    await writeFileDurably(discardedMark(jobDir), `${new Date().toISOString()}\n`);
  }
  let found = false;
  // U goes last: the merge reads `union.json` (secureSumFiles) until the job merged, and nothing after.
  const dir = secureDir(jobDir);
  for (const d of [join(dir, 'masked'), sumDir(jobDir), join(dir, 'union.bin'), join(dir, 'union.json')]) {
    if (!(await exists(d))) continue;
    found = true;
    await rm(d, { recursive: true, force: true });
  }
  return found;
}

/** Name of the sum as the merge's one contribution (in errors). */
export const SECURE_SUM = 'secure-sum';

/** The sum's tensor files by tensor name, from U's tensor list (written before the job merges). */
export function secureSumFiles(jobDir: string): Map<string, string> {
  const meta = JSON.parse(readFileSync(join(secureDir(jobDir), 'union.json'), 'utf8')) as {
    tensors: { name: string }[];
  };
  return new Map(meta.tensors.map((t, i) => [t.name, join(sumDir(jobDir), `${i}.dppa`)]));
}

/**
 * Removes the masks and writes the sum on U, tensor by tensor.
 * @param survivors - Names of the parties of U3 (their masked files are summed).
 */
export async function writeSum(
  jobDir: string,
  union: Union,
  survivors: readonly string[],
  removal: MaskRemoval,
  fp: FixedPoint,
  baseFingerprint: string,
  signal: AbortSignal,
): Promise<void> {
  await mkdir(sumDir(jobDir), { recursive: true });
  for (const [i, t] of union.tensors.entries()) {
    signal.throwIfAborted();
    await refuseIfDiscarded(jobDir);
    const header: DeltaHeader = {
      formatVersion: DELTA_FORMAT_VERSION,
      baseFingerprint,
      method: '',
      rate: 0,
      levels: [0],
      options: {},
      valueDtype: ValueDtype.VALUE_DTYPE_F32,
      tensors: [
        {
          name: t.name,
          shape: t.shape.map(BigInt),
          kind: TensorKind.TENSOR_KIND_OUTSIDE,
          layer: -1,
          levelRates: [0],
          sent: true,
          baseSha256: new Uint8Array(0),
        },
      ],
      producer: 'dppa secure aggregation (unmasked sum)',
      pruneMethod: PruneMethod.PRUNE_METHOD_UNSPECIFIED,
      outside: OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED,
      valueKind: ValueKind.VALUE_KIND_UNSPECIFIED,
    };
    const w = await DeltaFileWriter.create(join(sumDir(jobDir), `${i}.dppa`));
    try {
      await w.write({ header });
      const records = new TensorRecordStream(t.name, t.shape, { valueDtype: ValueDtype.VALUE_DTYPE_F32 });
      await w.write(records.begin());
      // A range of U at a time, whole chunks each (the same chunks as one pass over the tensor).
      for (let start = 0; start < t.count; start += RANGE_WORDS) {
        // A tensor of U may take many ranges: a job stopped meanwhile stops here, not at the next tensor.
        signal.throwIfAborted();
        const n = Math.min(RANGE_WORDS, t.count - start);
        const sum = new Uint32Array(n);
        for (const party of survivors) addInto(sum, await readMasked(jobDir, party, t.offset + start, n));
        removeMasks(sum, removal, t.offset + start);
        const values = decodeSum(sum, fp, new Float32Array(n));
        const positions = Float64Array.from(await unionPositions(union, t, start, n));
        for (const r of records.chunks(0, { positions, values })) await w.write(r);
      }
      await w.write(records.end(1));
      await w.close();
    } catch (err) {
      await w.abort();
      throw err;
    }
    // A file made after the discard deleted the folder is removed (the discard writes its mark before it deletes).
    await refuseIfDiscarded(jobDir);
  }
}

/** Throws, the sum's folder removed, once the job's secure data was discarded (the job ended meanwhile). */
async function refuseIfDiscarded(jobDir: string): Promise<void> {
  if (!(await secureDataDiscarded(jobDir))) return;
  await rm(sumDir(jobDir), { recursive: true, force: true });
  throw new Error(`${jobDir}: the job ended and its secure data was deleted: the sum is not written`);
}
