/**
 * Masks. Party u adds to its coded values a self mask PRG(b_u) and, for every
 * other party v that shared its keys, a pairwise mask PRG(s_uv) — added when
 * v > u, subtracted when v < u — where s_uv comes from the X25519 secret of
 * their mask keys, the same from both ends. Summed over all parties the
 * pairwise masks cancel; the self masks are removed by the server once it
 * has rebuilt each b_u from shares (see unmask.ts).
 */
import { deriveKey } from './derive.js';
import { encodeFixed, type Encoded, type FixedPoint } from './fixed-point.js';
import { addPrg } from './prg.js';
import { sharedSecret } from './x25519.js';

/** The PRG keys of one party's masks. */
export interface MaskKeys {
  /** The party's index. */
  index: number;
  /** The key of its self mask, from its seed b_u. */
  self: Uint8Array;
  /** The key shared with each other party that shared its keys. */
  peers: { index: number; key: Uint8Array }[];
}

/** The pairwise mask key between a party's mask private key and a peer's mask public key. */
export function pairwiseMaskKey(maskPrivateKey: Uint8Array, peerMaskPublicKey: Uint8Array, jobId: string): Uint8Array {
  return deriveKey(sharedSecret(maskPrivateKey, peerMaskPublicKey), jobId, 'pairwise-mask');
}

/** The self mask key of a 32-byte seed. */
export function selfMaskKey(seed: Uint8Array, jobId: string): Uint8Array {
  return deriveKey(seed, jobId, 'self-mask');
}

/** The sign with which party `own` adds the pairwise mask it shares with `peer`. */
export function pairwiseSign(own: number, peer: number): 1 | -1 {
  return peer > own ? 1 : -1;
}

/** Adds the masks of `keys` to words `[offset, offset + words.length)` of a vector on U, in place. */
export function applyMasks(words: Uint32Array, keys: MaskKeys, offset = 0): void {
  addPrg(words, keys.self, offset, 1);
  for (const peer of keys.peers) addPrg(words, peer.key, offset, pairwiseSign(keys.index, peer.index));
}

/** Codes `values` (a range of the party's vector on U starting at `offset`) and masks them. */
export function maskValues(values: ArrayLike<number>, fp: FixedPoint, keys: MaskKeys, offset = 0): Encoded {
  const encoded = encodeFixed(values, fp);
  applyMasks(encoded.words, keys, offset);
  return encoded;
}
