/**
 * The merge of one tensor: `base + Σ_i c_i · Σ_p f_ip · Δ_i|p` accumulated in
 * fp32 (Δ = F − B for uploads of fine-tuned weights), then encoded in the base's dtype. The one implementation the worker
 * threads, the inline runner and the DPA search's ONNX evaluator call.
 */
import { BaseDeltaError, FormatError } from '../../proto/errors.js';
import { bytesPerElement, type Checkpoint, encodeFromF32 } from '../../proto/safetensors/index.js';
import { partitionFactor } from '../../proto/algorithm/index.js';
import {
  addChunkScaled,
  carriesFinetuned,
  FinetunedToDelta,
  readDeltaFile,
  TensorAssembler,
} from '../../proto/sparse/index.js';
import { PatchSupport, patchTensorRecords } from '../../proto/patch/index.js';
import { OrderedHash } from './ordered-hash.js';
import { writePiece } from './patch-output.js';

/** One party's entries of a tensor. */
export interface Contribution {
  /** The party whose entries these are (named by {@link SpooledTensorError}). */
  party: string;
  /** Spool file: a one-tensor `.dppa` file. */
  file: string;
  /** Weight c_i of the party's delta. */
  weight: number;
  /** Amplification factor per partition, partition 1 first. */
  factors: readonly number[];
}

/** What to merge for one tensor; plain data, so that it can be posted to a worker. */
export interface TensorTask {
  name: string;
  /** In the order they are added (the job's party order). */
  contributions: Contribution[];
  /** Scale partition 0 (outside tensors) by the party's largest factor instead of 1. */
  outsideByMax: boolean;
  /**
   * Also write the tensor's piece of the merged patch (proto/patch, server/merge/patch-output.ts): its records,
   * behind the SHA-256 of the base tensor, to the file `index` of the pieces folder `dir`. @default none
   */
  patchPiece?: { dir: string; index: number };
  /** Produce the dense tensor. @default true */
  dense?: boolean;
}

/** A merged tensor (its merged-patch piece, if asked for, is written by then). */
export interface MergedOutputs {
  /** The tensor in the base's dtype; empty when the task asked for no dense tensor. */
  bytes: Uint8Array;
}

/**
 * A party's spooled tensor cannot be used: damaged, cut short, another tensor,
 * or gone. The fault is that party's data alone: the job sends the party back
 * to collecting, with this tensor discarded, instead of failing.
 */
export class SpooledTensorError extends FormatError {
  override name = 'SpooledTensorError';
  constructor(
    readonly party: string,
    /** What is wrong, naming the spool file and tensor. */
    readonly reason: string,
    readonly spoolFile: string,
    readonly tensorName: string,
    opts: ErrorOptions = {},
  ) {
    super(`party ${party}: ${reason}`, opts);
  }
}

/**
 * Merges one tensor, also writing the tensor's merged-patch piece when
 * `task.patchPiece`: the positions some party's entries reached, with the values
 * of the same accumulator rounded by the same function as the dense tensor,
 * behind the SHA-256 of the base tensor's bytes (hashed as they are read).
 * The piece's records are written block by block, never held whole.
 * @param buffer - Reused fp32 accumulator; must hold the tensor's elements.
 * @param out - Reused output memory, used if it holds the result (2-byte aligned). @default new memory
 * @returns `bytes`: the merged tensor in the base's dtype (bf16/f16 rounded to nearest even): the start of
 *   `out` when it was used, otherwise new memory (never a view of `buffer`).
 * @throws SpooledTensorError naming the party, spool file and tensor if a spooled tensor is damaged, is another tensor or is gone.
 */
export async function mergeTensorOutputs(
  base: Checkpoint,
  task: TensorTask,
  buffer: Float32Array,
  signal?: AbortSignal,
  out?: Uint8Array,
): Promise<MergedOutputs> {
  const info = base.info(task.name);
  const piece = task.patchPiece;
  const support = piece === undefined ? undefined : new PatchSupport(info.numel, task.name);
  const hash = piece === undefined ? undefined : new OrderedHash(info.byteLength);
  const acc = await accumulateTensor(base, task, buffer, signal, support, hash);
  if (piece !== undefined) {
    const records = patchTensorRecords(task.name, info.shape, info.dtype, acc, support!);
    await writePiece(piece.dir, piece.index, hash!.digest(), records);
  }
  if (task.dense === false) return { bytes: new Uint8Array(0) };
  const fits = out !== undefined && out.byteLength >= acc.length * bytesPerElement(info.dtype);
  const encoded = encodeFromF32(acc, info.dtype, fits ? out : undefined);
  // An F32 base encodes to a view of the accumulator, which the next tensor overwrites.
  const bytes = encoded.buffer === buffer.buffer ? encoded.slice() : encoded;
  return { bytes };
}

/**
 * `base + Σ_i c_i · Σ_p f_ip · Δ_i|p` of one tensor in fp32, before it is
 * encoded: the merge encodes it, the ONNX evaluator of the DPA search feeds it
 * to a model.
 * @param buffer - Reused fp32 accumulator; must hold the tensor's elements.
 * @returns A view of `buffer` holding the tensor.
 * @throws As {@link mergeTensorOutputs}.
 */
export async function accumulateTensor(
  base: Checkpoint,
  task: TensorTask,
  buffer: Float32Array,
  signal?: AbortSignal,
  support?: PatchSupport,
  baseHash?: OrderedHash,
): Promise<Float32Array> {
  const opts = signal === undefined ? {} : { signal };
  const onRaw = baseHash === undefined ? {} : { onRaw: (chunk: Uint8Array, at: number) => baseHash.add(chunk, at) };
  const acc = await base.readF32(task.name, { into: buffer, ...opts, ...onRaw });
  for (const c of task.contributions)
    await addSpooled(acc, task.name, c, task.outsideByMax, { ...opts, support, base });
  return acc;
}

/**
 * Adds `c_i · f_p · Δ|p` of one spooled tensor into `acc`, chunk by chunk, checking every record again;
 * fine-tuned weights (VALUE_KIND_FINETUNED) are turned into Δ = F − B first, so factors scale Δ.
 * @throws SpooledTensorError when the spool file is unusable or missing.
 * @throws BaseDeltaError when F − B is not a finite fp32 number (a permanent job failure, see failure-policy.ts).
 */
async function addSpooled(
  acc: Float32Array,
  name: string,
  c: Contribution,
  outsideByMax: boolean,
  opts: SpoolReadOptions,
): Promise<void> {
  try {
    await addSpooledFile(acc, name, c, outsideByMax, opts);
  } catch (err) {
    if (opts.signal?.aborted === true) throw err;
    // F − B not finite: the base (or fp32) is at fault, not the party's data; sending the party back cannot help.
    if (err instanceof BaseDeltaError)
      throw new BaseDeltaError(
        `${err.message} (party ${c.party}'s fine-tuned value against the job's base: a non-finite base weight, or a difference beyond fp32)`,
        { cause: err },
      );
    if (err instanceof FormatError) throw new SpooledTensorError(c.party, err.message, c.file, name, { cause: err });
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new SpooledTensorError(c.party, `${c.file}, tensor "${name}": the spool file is gone`, c.file, name, {
        cause: err,
      });
    throw err;
  }
}

/** Abort signal, the merged patch's support to mark, and the base (for fine-tuned values). */
interface SpoolReadOptions {
  signal?: AbortSignal;
  support?: PatchSupport | undefined;
  base: Checkpoint;
}

async function addSpooledFile(
  acc: Float32Array,
  name: string,
  c: Contribution,
  outsideByMax: boolean,
  opts: SpoolReadOptions,
): Promise<void> {
  const { file } = c;
  let assembler: TensorAssembler | undefined;
  let toDelta: FinetunedToDelta | undefined;
  // Transient: each record is consumed before the next is read, so they share one read buffer.
  const readOpts = { transient: true, ...(opts.signal === undefined ? {} : { signal: opts.signal }) };
  for await (const record of readDeltaFile(file, readOpts)) {
    if (record.header !== undefined) {
      const planned = record.header.tensors;
      if (planned.length !== 1 || planned[0]!.name !== name)
        throw new FormatError('spool file does not hold this tensor', { file, tensor: name });
      assembler = new TensorAssembler({ file, entries: 'stream' });
      if (carriesFinetuned(record.header)) toDelta = new FinetunedToDelta(opts.base, name, file);
      continue;
    }
    const chunk = assembler!.push(record);
    if (chunk === undefined) continue;
    const scale = c.weight * partitionFactor(c.factors, chunk.partition, outsideByMax);
    if (toDelta !== undefined) await toDelta.addScaled(acc, chunk, scale, opts.signal);
    else addChunkScaled(acc, chunk, scale);
    opts.support?.add(chunk);
  }
  if (assembler?.complete !== true)
    throw new FormatError('spool file ends before the tensor end', { file, tensor: name });
}
