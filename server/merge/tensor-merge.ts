/**
 * The merge of one tensor: `base + Σ_i c_i · Σ_p f_ip · Δ_i|p` accumulated in
 * fp32 (Δ = F − B for uploads of fine-tuned weights), then encoded in the base's dtype. The one implementation the worker
 * threads, the inline runner and the DPA search's ONNX evaluator call.
 */
import { BaseDeltaError, FormatError } from '../../proto/errors.js';
import { type Checkpoint, encodeFromF32 } from '../../proto/safetensors/index.js';
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
  /**
   * The spool holds fine-tuned weights (VALUE_KIND_FINETUNED), turned into deltas against the base; false for
   * deltas. @default unknown: it may
   */
  finetuned?: boolean;
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
 * @param buffer - Reused fp32 accumulator; must hold the tensor's elements. The dense result is encoded into its
 *   own memory (a bf16/f16 element never overtakes an fp32 one not yet read), so a tensor in flight needs no
 *   second buffer.
 * @returns `bytes`: the merged tensor in the base's dtype (bf16/f16 rounded to nearest even), a view of the start
 *   of `buffer`'s memory (which then no longer holds the fp32 values).
 * @throws SpooledTensorError naming the party, spool file and tensor if a spooled tensor is damaged, is another tensor or is gone.
 */
export async function mergeTensorOutputs(
  base: Checkpoint,
  task: TensorTask,
  buffer: Float32Array,
  signal?: AbortSignal,
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
  if (info.dtype === 'F32') return { bytes: new Uint8Array(acc.buffer, acc.byteOffset, acc.byteLength) };
  return { bytes: encodeFromF32(acc, info.dtype, new Uint8Array(acc.buffer, acc.byteOffset, acc.byteLength)) };
}

/**
 * Largest BF16 base tensor (in bytes) whose bit patterns a merge keeps beside the accumulator, so that the
 * parties after the first form F − B from memory instead of reading the base again through windows; larger
 * tensors (embeddings) are read again, so that a thread's memory stays bounded. Its accumulator with the bits,
 * 3× its size, is the largest a merge thread keeps for the next tensor ({@link ACCUMULATOR_KEPT_MAX_BYTES}).
 */
const BASE_BITS_MAX_BYTES = 32 * 1024 * 1024;

/**
 * Largest accumulator (bytes) a merge thread keeps for the next tensor (merge-runner.ts): that of a BF16 tensor
 * keeping its bits ({@link BASE_BITS_MAX_BYTES}), or of a 24 Mi element tensor without.
 */
export const ACCUMULATOR_KEPT_MAX_BYTES = 3 * BASE_BITS_MAX_BYTES;

/**
 * Elements of the fp32 buffer to hand {@link mergeTensorOutputs} for a tensor: its own, and room for the base's
 * bit patterns when they are kept (see {@link BASE_BITS_MAX_BYTES}).
 */
export function accumulatorElements(
  info: { dtype: string; numel: number; byteLength: number },
  task: TensorTask,
): number {
  return info.numel + (keepsBaseBits(info, task) ? Math.ceil(info.numel / 2) : 0);
}

/** Only when they will be read: a BF16 tensor, not too large, with fine-tuned values from a party after the first. */
function keepsBaseBits(info: { dtype: string; byteLength: number }, task: TensorTask): boolean {
  return (
    info.dtype === 'BF16' &&
    info.byteLength <= BASE_BITS_MAX_BYTES &&
    task.contributions.slice(1).some((c) => c.finetuned !== false)
  );
}

/**
 * `base + Σ_i c_i · Σ_p f_ip · Δ_i|p` of one tensor in fp32, before it is
 * encoded: the merge encodes it, the ONNX evaluator of the DPA search feeds it
 * to a model.
 * @param buffer - Reused fp32 accumulator; must hold the tensor's elements (and, for the base's bit patterns,
 *   {@link accumulatorElements}; without that room they are not kept).
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
  const info = base.info(task.name);
  const keep = keepsBaseBits(info, task) && buffer.length >= accumulatorElements(info, task);
  const bits = keep ? new Uint16Array(buffer.buffer, buffer.byteOffset + info.numel * 4, info.numel) : undefined;
  const bitBytes = bits === undefined ? undefined : new Uint8Array(bits.buffer, bits.byteOffset, info.byteLength);
  const onRaw =
    baseHash === undefined && bitBytes === undefined
      ? {}
      : {
          onRaw: (chunk: Uint8Array, at: number) => {
            bitBytes?.set(chunk, at);
            baseHash?.add(chunk, at);
          },
        };
  const acc = await base.readF32(task.name, { into: buffer.subarray(0, info.numel), ...opts, ...onRaw });
  for (const [i, c] of task.contributions.entries())
    await addSpooled(acc, task.name, c, task.outsideByMax, { ...opts, support, base, first: i === 0, bits });
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

/**
 * Abort signal, the merged patch's support to mark, and for fine-tuned values the base: whether `acc` still holds
 * it (the first contribution: no party has added yet) and its bit patterns when kept.
 */
interface SpoolReadOptions {
  signal?: AbortSignal;
  support?: PatchSupport | undefined;
  base: Checkpoint;
  first: boolean;
  bits: Uint16Array | undefined;
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
  let overBase: number | undefined;
  // Transient: each record is consumed before the next is read, so they share one read buffer.
  const readOpts = { transient: true, ...(opts.signal === undefined ? {} : { signal: opts.signal }) };
  for await (const record of readDeltaFile(file, readOpts)) {
    if (record.header !== undefined) {
      const planned = record.header.tensors;
      if (planned.length !== 1 || planned[0]!.name !== name)
        throw new FormatError('spool file does not hold this tensor', { file, tensor: name });
      assembler = new TensorAssembler({ file, entries: 'stream' });
      if (carriesFinetuned(record.header)) toDelta = new FinetunedToDelta(opts.base, name, file, opts.bits);
      continue;
    }
    const chunk = assembler!.push(record);
    if (chunk === undefined) continue;
    const scale = c.weight * partitionFactor(c.factors, chunk.partition, outsideByMax);
    // B is read from `acc` only in the first party's first partition: there positions strictly increase (the
    // assembler checks), so `acc` still holds the base at each; a later partition may repeat a position (a spool
    // from an older server, or edited), so it reads B from the base.
    overBase ??= opts.first ? chunk.partition : -1;
    if (toDelta === undefined) addChunkScaled(acc, chunk, scale);
    else if (chunk.partition === overBase) toDelta.addScaledOverBase(acc, chunk, scale);
    else await toDelta.addScaled(acc, chunk, scale, opts.signal);
    opts.support?.add(chunk);
  }
  if (assembler?.complete !== true)
    throw new FormatError('spool file ends before the tensor end', { file, tensor: name });
}
