/**
 * The merged patch: the merged model as a sparse overwrite of the base it was
 * merged into, in the `.dppa` container (layout: docs/formats.md, "Merged patch").
 */
export {
  checkPatchNumel,
  PATCH_FILE_NAME,
  PatchSupport,
  patchHeader,
  patchTensorRecords,
  patchValueDtype,
} from './patch-records.js';
export { applyPatch, PatchBaseMismatchError, type ApplyPatchOptions, type ApplyPatchReport } from './apply-patch.js';
