/**
 * Applying a merged patch: copy the base, overwrite the patch's positions with
 * its values, byte for byte. The output is written in the base's layout by
 * the same checkpoint writer as the server's dense merge, under a temporary
 * name renamed only once every tensor is written, so a damaged patch or one
 * made for another base leaves nothing behind.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { FormatError } from '../errors.js';
import { baseFingerprint } from '../fingerprint.js';
import { ValueKind } from '../gen/dppa/v1/sparse.js';
import { bytesPerElement, Checkpoint, CheckpointWriter } from '../safetensors/index.js';
import { readDeltaFile, readDeltaHeader, TensorAssembler } from '../sparse/index.js';
import { patchValueDtype } from './patch-records.js';

/** A patch made for another base than the one given. */
export class PatchBaseMismatchError extends FormatError {
  override name = 'PatchBaseMismatchError';
}

/** What {@link applyPatch} reads and writes. */
export interface ApplyPatchOptions {
  /** Base checkpoint folder (or file) the patch was made for. */
  base: string;
  /** The merged patch (`.dppa`, value kind MERGED). */
  patch: string;
  /** Output folder; appears only when complete. */
  out: string;
  /** Replace `out` if it exists. @default false */
  overwrite?: boolean | undefined;
  signal?: AbortSignal | undefined;
  /** Called after each tensor written. @default none */
  onProgress?: ((p: { tensor: string; tensorsDone: number; tensorsTotal: number }) => void) | undefined;
}

/** What {@link applyPatch} wrote. */
export interface ApplyPatchReport {
  out: string;
  /** Tensors the patch overwrote (in part or whole). */
  tensorsPatched: number;
  /** Tensors copied from the base unchanged. */
  tensorsCopied: number;
  /** Positions overwritten, over every tensor. */
  positions: number;
}

/**
 * Writes base + patch as a checkpoint in the base's layout (extra files of a base folder copied).
 * @throws PatchBaseMismatchError if the patch names another base's fingerprint, or a tensor it changes has other
 *   bytes in the base than the SHA-256 in its header (naming the tensor).
 * @throws FormatError / ChecksumError / TruncatedError if the patch is not a merged patch, is damaged or cut short,
 *   or does not fit the base (a tensor it lacks, another shape or dtype); nothing is written then.
 * @throws RangeError if `out` exists and `overwrite` is not set.
 */
export async function applyPatch(opts: ApplyPatchOptions): Promise<ApplyPatchReport> {
  const { signal } = opts;
  const readOpts = signal === undefined ? {} : { signal };
  const file = opts.patch;
  const header = await readDeltaHeader(file, readOpts);
  if (header.valueKind !== ValueKind.VALUE_KIND_MERGED)
    throw new FormatError('not a merged patch (its values are deltas: apply it with dppa apply --delta)', { file });
  const base = await Checkpoint.open(opts.base);
  try {
    const fp = await baseFingerprint(base, readOpts);
    if (fp !== header.baseFingerprint) {
      throw new PatchBaseMismatchError(
        `the patch is for another base (its fingerprint ${header.baseFingerprint}, ${opts.base} has ${fp})`,
        { file },
      );
    }
    const planned = header.tensors.map((t) => t.name);
    if (new Set(planned).size !== planned.length) throw new FormatError('the patch plans a tensor twice', { file });
    for (const t of header.tensors) {
      if (!base.has(t.name))
        throw new FormatError('the patch names a tensor the base does not have', { file, tensor: t.name });
      if (t.baseSha256.length !== 32)
        throw new FormatError(`the header gives no SHA-256 of the base tensor (${t.baseSha256.length} bytes)`, {
          file,
          tensor: t.name,
        });
    }
    const isDir = (await stat(opts.base)).isDirectory();
    const writer = await CheckpointWriter.create(opts.out, base.layout, {
      ...(isDir ? { copyExtraFilesFrom: opts.base } : {}),
      overwrite: opts.overwrite ?? false,
    });
    try {
      const total = base.tensors().length;
      let done = 0;
      let positions = 0;
      let next = 0;
      let tensor: { name: string; raw: Uint8Array; size: number; assembler: TensorAssembler } | undefined;
      for await (const record of readDeltaFile(file, readOpts)) {
        if (record.header !== undefined) continue;
        if (record.tensorBegin !== undefined) {
          const { name } = record.tensorBegin;
          if (tensor !== undefined)
            throw new FormatError(`tensor begins before tensor "${tensor.name}" ended`, { file, tensor: name });
          if (planned[next] !== name)
            throw new FormatError(
              `not the next planned tensor (the header plans ${planned[next] ?? 'no further tensor'} next)`,
              { file, tensor: name },
            );
          next++;
          const info = base.info(name);
          const shape = record.tensorBegin.shape.map(Number);
          if (shape.length !== info.shape.length || shape.some((d, i) => d !== info.shape[i])) {
            throw new FormatError(`shape [${shape.join(', ')}] in the patch, [${info.shape.join(', ')}] in the base`, {
              file,
              tensor: name,
            });
          }
          const raw = await base.readRaw(name, readOpts);
          const expected = Buffer.from(header.tensors[next - 1]!.baseSha256).toString('hex');
          const actual = createHash('sha256').update(raw).digest('hex');
          if (actual !== expected)
            throw new PatchBaseMismatchError(
              `the patch is for another base: this tensor of ${opts.base} has SHA-256 ${actual}, the patch's base ${expected}`,
              { file, tensor: name },
            );
          tensor = {
            name,
            raw,
            size: bytesPerElement(info.dtype),
            assembler: new TensorAssembler({ file, entries: 'stream' }),
          };
          tensor.assembler.push(record);
          continue;
        }
        if (tensor === undefined) throw new FormatError('a record comes before any tensor begins', { file });
        const chunk = tensor.assembler.push(record);
        if (chunk !== undefined) {
          if (record.chunk!.valueDtype !== patchValueDtype(base.info(tensor.name).dtype)) {
            throw new FormatError(
              `chunk ${chunk.index} carries values of another dtype than the base tensor's ${base.info(tensor.name).dtype}`,
              { file, tensor: tensor.name },
            );
          }
          overwrite(tensor.raw, tensor.size, chunk, record.chunk!.values);
          positions += chunk.count;
        }
        if (tensor.assembler.complete) {
          await writer.writeTensor(tensor.name, tensor.raw);
          opts.onProgress?.({ tensor: tensor.name, tensorsDone: ++done, tensorsTotal: total });
          tensor = undefined;
        }
      }
      if (tensor !== undefined) throw new FormatError('the patch ends inside a tensor', { file, tensor: tensor.name });
      if (next < planned.length)
        throw new FormatError(`${planned.length - next} planned tensors missing, first "${planned[next]}"`, { file });
      const patched = new Set(planned);
      for (const info of base.tensors()) {
        if (patched.has(info.name)) continue;
        signal?.throwIfAborted();
        await writer.writeTensor(info.name, await base.readRaw(info.name, readOpts));
        opts.onProgress?.({ tensor: info.name, tensorsDone: ++done, tensorsTotal: total });
      }
      await writer.commit();
      return { out: opts.out, tensorsPatched: planned.length, tensorsCopied: total - planned.length, positions };
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    await base.close();
  }
}

/** Copies each value's bytes of a checked chunk to its position in the raw tensor: no conversion, so the bytes are the server's. */
function overwrite(
  raw: Uint8Array,
  size: number,
  chunk: { range: boolean; firstPosition: number; count: number; positions: Float64Array },
  values: Uint8Array,
): void {
  if (chunk.range) {
    raw.set(values.subarray(0, chunk.count * size), chunk.firstPosition * size);
    return;
  }
  const pos = chunk.positions;
  for (let i = 0; i < chunk.count; i++) {
    const at = pos[i]! * size;
    for (let b = 0; b < size; b++) raw[at + b] = values[i * size + b]!;
  }
}
