/**
 * `base + scale · Σ_p f_p · Δ|partition p` written as a checkpoint in the base's
 * layout and dtype (Δ = F − B for a file of fine-tuned weights): what a party evaluates locally during the DPA search, and
 * a way to check a pruned delta by hand.
 */
import { stat } from 'node:fs/promises';
import { FormatError } from '../proto/errors.js';
import { baseFingerprint } from '../proto/fingerprint.js';
import { Checkpoint, CheckpointWriter } from '../proto/safetensors/index.js';
import { partitionFactor } from '../proto/algorithm/index.js';
import {
  addChunkScaled,
  carriesFinetuned,
  FinetunedToDelta,
  readDeltaFile,
  readDeltaHeader,
  TensorAssembler,
} from '../proto/sparse/index.js';
import { ValueKind, type DeltaHeader } from '../proto/gen/dppa/v1/sparse.js';

/** Options of {@link applyDelta}. */
export interface ApplyOptions {
  /** Base checkpoint folder (or file). */
  base: string;
  /** The `.dppa` file. */
  delta: string;
  /** Output folder; appears only when complete. */
  out: string;
  /** One amplification factor per partition, partition 1 first. @default all 1 */
  factors?: number[];
  /** Weight of the whole delta (c_i in the merge). @default 1 */
  scale?: number;
  /** Scale outside tensors by the largest factor (the released code) instead of 1. @default false */
  outsideByMax?: boolean;
  /** Factor of outside tensors (partition 0), as a DPA evaluation request gives it; overrides `outsideByMax`. @default 1 (or the largest factor with `outsideByMax`) */
  outsideFactor?: number;
  /** Replace `out` if it exists. @default false */
  overwrite?: boolean;
  /** Cancels between tensors; nothing is left at `out`. */
  signal?: AbortSignal;
  /** Called after each tensor written. */
  onProgress?: (p: { tensor: string; tensorsDone: number; tensorsTotal: number }) => void;
}

/** What {@link applyDelta} did. */
export interface ApplyReport {
  out: string;
  factors: number[];
  scale: number;
  /** Tensors that received delta entries. */
  tensorsChanged: number;
  /** Tensors copied from the base unchanged. */
  tensorsCopied: number;
}

/**
 * Applies a pruned (and amplified) delta to its base.
 * @throws FormatError if the delta is malformed, made against another base, or names a tensor the base lacks.
 * @throws RangeError if the factors do not match the delta's partitions, or a factor is not finite.
 */
export async function applyDelta(opts: ApplyOptions): Promise<ApplyReport> {
  const base = await Checkpoint.open(opts.base);
  try {
    const readOpts = opts.signal === undefined ? {} : { signal: opts.signal };
    const header = await readDeltaHeader(opts.delta, readOpts);
    if (header.valueKind === ValueKind.VALUE_KIND_MERGED)
      throw new FormatError('this is a merged patch, not a delta: apply it with --patch (applyPatch)', {
        file: opts.delta,
      });
    if (header.valueKind !== ValueKind.VALUE_KIND_UNSPECIFIED && !carriesFinetuned(header))
      throw new FormatError(`value_kind ${header.valueKind} is not one this version reads`, {
        file: opts.delta,
      });
    const factors = opts.factors ?? header.levels.map(() => 1);
    checkFactors(factors, header, opts.delta);
    if (opts.outsideFactor !== undefined && !Number.isFinite(opts.outsideFactor))
      throw new RangeError(`outsideFactor: ${opts.outsideFactor} is not a finite number`);
    const factorOf = (partition: number): number =>
      partition === 0 && opts.outsideFactor !== undefined
        ? opts.outsideFactor
        : partitionFactor(factors, partition, opts.outsideByMax ?? false);
    const fp = await baseFingerprint(base);
    if (fp !== header.baseFingerprint) {
      throw new FormatError(
        `the delta was made against another base (its fingerprint ${header.baseFingerprint}, ${opts.base} has ${fp})`,
        { file: opts.delta },
      );
    }
    const scale = opts.scale ?? 1;
    const isDir = (await stat(opts.base)).isDirectory();
    const writer = await CheckpointWriter.create(opts.out, base.layout, {
      ...(isDir ? { copyExtraFilesFrom: opts.base } : {}),
      overwrite: opts.overwrite ?? false,
    });
    try {
      const total = base.tensors().length;
      let done = 0;
      const changed = new Set<string>();
      let acc: Float32Array | undefined;
      let assembler: TensorAssembler | undefined;
      let toDelta: FinetunedToDelta | undefined;
      for await (const record of readDeltaFile(opts.delta, readOpts)) {
        opts.signal?.throwIfAborted();
        if (record.header !== undefined) continue;
        if (record.tensorBegin !== undefined) {
          const name = record.tensorBegin.name;
          if (!base.has(name))
            throw new FormatError('the delta names a tensor the base does not have', {
              file: opts.delta,
              tensor: name,
            });
          const info = base.info(name);
          const shape = record.tensorBegin.shape.map(Number);
          if (shape.length !== info.shape.length || shape.some((d, i) => d !== info.shape[i])) {
            throw new FormatError(`shape [${shape.join(', ')}] in the delta, [${info.shape.join(', ')}] in the base`, {
              file: opts.delta,
              tensor: name,
            });
          }
          if (changed.has(name))
            throw new FormatError('tensor appears twice in the delta', { file: opts.delta, tensor: name });
          acc = await base.readF32(name);
          assembler = new TensorAssembler({ file: opts.delta, entries: 'stream' });
          toDelta = carriesFinetuned(header) ? new FinetunedToDelta(base, name, opts.delta) : undefined;
        }
        if (assembler === undefined || acc === undefined)
          throw new FormatError('a record comes before any tensor begins', { file: opts.delta });
        const chunk = assembler.push(record);
        if (chunk !== undefined) {
          if (toDelta !== undefined) await toDelta.convert(chunk, opts.signal);
          addChunkScaled(acc, chunk, scale * factorOf(chunk.partition));
        }
        if (assembler.complete) {
          const name = assembler.name!;
          await writer.writeTensorF32(name, acc);
          changed.add(name);
          acc = undefined;
          assembler = undefined;
          opts.onProgress?.({ tensor: name, tensorsDone: ++done, tensorsTotal: total });
        }
      }
      if (assembler !== undefined)
        throw new FormatError('the delta ends inside a tensor', { file: opts.delta, tensor: assembler.name });
      for (const info of base.tensors()) {
        if (changed.has(info.name)) continue;
        opts.signal?.throwIfAborted();
        await writer.writeTensor(info.name, await base.readRaw(info.name));
        opts.onProgress?.({ tensor: info.name, tensorsDone: ++done, tensorsTotal: total });
      }
      await writer.commit();
      return { out: opts.out, factors, scale, tensorsChanged: changed.size, tensorsCopied: total - changed.size };
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    await base.close();
  }
}

function checkFactors(factors: readonly number[], header: DeltaHeader, file: string): void {
  if (factors.length !== header.levels.length) {
    throw new RangeError(
      `factors: the delta ${file} has ${header.levels.length} partition(s) (levels ${header.levels.join(', ')}), got ${factors.length} factor(s)`,
    );
  }
  for (const f of factors) if (!Number.isFinite(f)) throw new RangeError(`factors: ${f} is not a finite number`);
}
