/**
 * The merge drivers' hook for the merged patch: where it goes, and opening its
 * writer with the header (the base's fingerprint and the tensors the parties
 * changed, in the base's order).
 */
import { join } from 'node:path';
import { MergeOutput } from '../../proto/gen/dppa/v1/jobs.js';
import { PATCH_FILE_NAME, patchHeader } from '../../proto/patch/index.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import { PatchWriter } from './patch-writer.js';

/** Where a merge writes its patch, and the base it is for. */
export interface PatchOutput {
  /** The patch file. */
  path: string;
  /** Fingerprint of the base (the job's), recorded in the patch's header. */
  baseFingerprint: string;
}

/** What a job's `merge.output` asks the merge to write. */
export function mergeOutputs(output: MergeOutput): { dense: boolean; patch: boolean } {
  return {
    dense: output !== MergeOutput.MERGE_OUTPUT_PATCH,
    patch: output !== MergeOutput.MERGE_OUTPUT_DENSE,
  };
}

/** The patch file of a job whose folder is `jobDir`. */
export function patchPath(jobDir: string): string {
  return join(jobDir, PATCH_FILE_NAME);
}

/**
 * Opens the patch writer, if a patch is asked for.
 * @param changed - Whether a tensor receives entries from some party (the tensors the patch holds).
 */
export async function openPatch(output: PatchOutput | undefined, base: Checkpoint, changed: (tensor: string) => boolean): Promise<PatchWriter | undefined> {
  if (output === undefined) return undefined;
  const tensors = base.tensors().filter((t) => changed(t.name));
  return PatchWriter.create(output.path, patchHeader(output.baseFingerprint, tensors));
}
