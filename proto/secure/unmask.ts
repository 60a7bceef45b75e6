/**
 * The server's removal of masks from the sum of the survivors' masked vectors:
 * each survivor's self mask, and for each party that dropped after sharing
 * its keys, the pairwise mask every survivor added with it (which no longer
 * cancels). Works on any range of the sum, so a spooled sum can be unmasked
 * chunk by chunk.
 */
import { pairwiseSign } from './masks.js';
import { addPrg } from './prg.js';

/** What the server must subtract, rebuilt from the revealed shares. */
export interface MaskRemoval {
  /** The self mask keys of the survivors. */
  selfKeys: Uint8Array[];
  /** The pairwise mask keys between each survivor and each dropout. */
  pairs: { survivor: number; dropout: number; key: Uint8Array }[];
}

/** Removes the masks from words `[offset, offset + sum.length)` of the sum, in place. */
export function removeMasks(sum: Uint32Array, removal: MaskRemoval, offset = 0): void {
  for (const key of removal.selfKeys) addPrg(sum, key, offset, -1);
  // The survivor added its mask with the dropout with pairwiseSign(survivor, dropout): take it off.
  for (const pair of removal.pairs)
    addPrg(sum, pair.key, offset, pairwiseSign(pair.survivor, pair.dropout) === 1 ? -1 : 1);
}

/** Adds a masked vector (or a range of it) into a running sum, modulo 2^32. */
export function addInto(sum: Uint32Array, words: Uint32Array): void {
  if (sum.length !== words.length) throw new RangeError(`addInto: ${sum.length} and ${words.length} words`);
  for (let i = 0; i < sum.length; i++) sum[i] = sum[i]! + words[i]!;
}
