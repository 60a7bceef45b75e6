/** Durability helper shared by the writers on both sides. */
import { syncPath } from './safetensors/fs-util.js';

/**
 * fsyncs a folder so that renames in it survive a power cut. Best effort: some
 * file systems refuse to open or sync a folder, and the rename has happened anyway.
 */
export async function syncFolder(path: string): Promise<void> {
  try {
    await syncPath(path);
  } catch {
    // Only durability across a power cut is weaker; the file is complete and in place.
  }
}
