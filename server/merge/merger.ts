/**
 * The merge `W = W_base + Σ_i c_i · Σ_p f_ip · Δ_i|p` of a whole checkpoint
 * in one call (spec "Merge"): the reference the tests and `npm run bench:merge`
 * use, and the helpers the server's merge driver shares (merge-driver.ts).
 * Tensors are merged by the same kernel (tensor-merge.ts), in fp32, parties
 * in the given order, written in the base's dtype; tensors no party sent are
 * copied; the output appears under its final name only when complete.
 */
import { createHash } from 'node:crypto';
import { open, readdir, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { FormatError } from '../../proto/errors.js';
import { Checkpoint, CheckpointWriter, type CheckpointLayout } from '../../proto/safetensors/index.js';
import type { MergedFileInfo } from '../jobs/job-store.js';
import { inWindow } from '../backend/in-process.js';
import { inlineRunner, type MergeRunner, workerRunner } from './merge-runner.js';
import type { Contribution } from './tensor-merge.js';

/** One party's contribution. */
export interface MergeParty {
  name: string;
  /** Weight c_i of the party's delta. */
  weight: number;
  /** Amplification factor per partition, partition 1 first. */
  factors: readonly number[];
  /** Spool file (a one-tensor `.dppa` file) of every tensor the party sent, by tensor name. */
  tensors: ReadonlyMap<string, string>;
}

/** Progress after each tensor written. */
export interface MergeProgressInfo {
  tensorsDone: number;
  tensorsTotal: number;
  /** Bytes of the base tensor just done. */
  tensorBytes: number;
}

/** Options of {@link mergeCheckpoint}. */
export interface MergeInput {
  /** Base checkpoint folder (or file). */
  basePath: string;
  /** Output folder; replaced when the merge completes, untouched if it fails. */
  outDir: string;
  /** Parties in the order their deltas are added. */
  parties: readonly MergeParty[];
  /** Scale partition 0 (outside tensors) by the party's largest factor instead of 1. */
  outsideByMax: boolean;
  /** Worker threads doing the additions; 0 does them in this thread (one tensor added while another is read or written). @default min(2, available cores) */
  workers?: number;
  /** Stops the merge; the temporary output is removed and the signal's reason thrown. */
  signal?: AbortSignal;
  /** Called after each tensor written. */
  onProgress?: (p: MergeProgressInfo) => void;
}

/** What a merge produced. */
export interface MergeResult {
  /** Every file of the output folder with its size and SHA-256. */
  files: MergedFileInfo[];
  /** Tensors that received entries from at least one party. */
  tensorsMerged: number;
  /** Tensors copied from the base unchanged. */
  tensorsCopied: number;
}

/** Default number of merge worker threads. */
export function defaultMergeWorkers(): number {
  return Math.min(2, availableParallelism());
}

/**
 * Writes the merged checkpoint.
 * @throws SpooledTensorError naming the party, spool file and tensor if a spooled tensor is damaged or gone;
 *   FormatError if a spooled tensor does not fit the base.
 * @throws The signal's reason when aborted; Error from the file system.
 */
export async function mergeCheckpoint(input: MergeInput): Promise<MergeResult> {
  const { signal } = input;
  signal?.throwIfAborted();
  const readOpts = signal === undefined ? {} : { signal };
  const base = await Checkpoint.open(input.basePath);
  try {
    for (const p of input.parties) {
      for (const [name, file] of p.tensors) {
        if (!base.has(name))
          throw new FormatError(`party ${p.name} sent a tensor the base does not have`, { file, tensor: name });
      }
    }
    const isDir = (await stat(input.basePath)).isDirectory();
    const writer = await CheckpointWriter.create(input.outDir, base.layout, {
      ...(isDir ? { copyExtraFilesFrom: input.basePath } : {}),
      overwrite: true,
    });
    const workers = input.workers ?? defaultMergeWorkers();
    const runner: MergeRunner = workers === 0 ? inlineRunner(base) : workerRunner(input.basePath, workers);
    // Workers do not see the signal: stopping them is what aborts the tensors they are on.
    const stop = (): void => void runner.close();
    signal?.addEventListener('abort', stop);
    try {
      const tensors = base.tensors();
      const hashes = new WeightFileHashes(base.layout, writer.tmpDir);
      let merged = 0;
      let done = 0;
      const one = async (name: string): Promise<void> => {
        signal?.throwIfAborted();
        const info = base.info(name);
        const contributions = contributionsTo(name, input.parties);
        if (contributions.length === 0) {
          await writer.writeTensor(name, await base.readRaw(name, readOpts));
        } else {
          merged++;
          const result = await runner.run(
            { name, contributions, outsideByMax: input.outsideByMax },
            info.numel,
            signal,
          );
          try {
            await writer.writeTensor(name, result.bytes);
          } finally {
            result.release();
          }
        }
        hashes.written(name);
        input.onProgress?.({ tensorsDone: ++done, tensorsTotal: tensors.length, tensorBytes: info.byteLength });
      };
      // One lane more than the runner has, so that this thread copies and writes while every worker adds.
      await inWindow(
        tensors.map((t) => t.name),
        runner.width + 1,
        one,
      );
      signal?.throwIfAborted();
      const known = await hashes.all();
      await writer.commit();
      return {
        files: await describeFiles(input.outDir, known),
        tensorsMerged: merged,
        tensorsCopied: tensors.length - merged,
      };
    } catch (err) {
      throw signal?.aborted === true ? signal.reason : err;
    } finally {
      signal?.removeEventListener('abort', stop);
      await runner.close();
      await writer.abort();
    }
  } finally {
    await base.close();
  }
}

/** The parties' entries of one tensor, in the parties' order: what a tensor merge adds to the base. */
export function contributionsTo(tensor: string, parties: readonly MergeParty[]): Contribution[] {
  return parties.flatMap((p) => {
    const file = p.tensors.get(tensor);
    return file === undefined ? [] : [{ party: p.name, file, weight: p.weight, factors: [...p.factors] }];
  });
}

/**
 * Size and SHA-256 of every file of a folder (a checkpoint folder is flat).
 * @param known - Files already described (by name), not read again.
 */
export async function describeFiles(
  dir: string,
  known: ReadonlyMap<string, MergedFileInfo> = new Map(),
): Promise<MergedFileInfo[]> {
  const files: MergedFileInfo[] = [];
  for (const entry of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    if (!entry.isFile()) continue;
    files.push(known.get(entry.name) ?? (await describeFile(join(dir, entry.name), entry.name)));
  }
  return files;
}

/** Read size for hashing: 1 MiB reads took a third less time and CPU than 64 KiB ones. */
const HASH_READ_BYTES = 1024 * 1024;

/** Size and SHA-256 of a file, read through one buffer (fresh memory per read made work for the garbage collector). */
async function describeFile(path: string, name: string): Promise<MergedFileInfo> {
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafeSlow(HASH_READ_BYTES);
  const fh = await open(path, 'r');
  try {
    let size = 0;
    for (let n; (n = (await fh.read(buf, 0, buf.length, size)).bytesRead) > 0; size += n)
      hash.update(buf.subarray(0, n));
    return { path: name, size, sha256: hash.digest('hex') };
  } finally {
    await fh.close();
  }
}

/**
 * The SHA-256 of each weight file of the output, read back as soon as its last
 * tensor is written, while the merge goes on with the next file's tensors
 * (tensors are merged in file order): only the last file is hashed after the
 * last tensor, instead of every file.
 */
class WeightFileHashes {
  private readonly left = new Map<string, number>();
  private readonly fileOf = new Map<string, string>();
  private readonly hashing = new Map<string, Promise<MergedFileInfo>>();

  constructor(
    layout: CheckpointLayout,
    private readonly dir: string,
  ) {
    for (const f of layout.files) {
      this.left.set(f.fileName, f.tensors.length);
      for (const t of f.tensors) this.fileOf.set(t.name, f.fileName);
    }
  }

  /** Notes that a tensor is written; starts hashing its file once the file is complete. */
  written(tensor: string): void {
    const file = this.fileOf.get(tensor)!;
    const left = this.left.get(file)! - 1;
    this.left.set(file, left);
    if (left > 0) return;
    const p = describeFile(join(this.dir, file), file);
    // Awaited by all(); until then a failure must not surface as an unhandled rejection.
    p.catch(() => undefined);
    this.hashing.set(file, p);
  }

  /** The files described so far, by name. */
  async all(): Promise<Map<string, MergedFileInfo>> {
    return new Map(await Promise.all([...this.hashing].map(async ([name, p]) => [name, await p] as const)));
  }
}
