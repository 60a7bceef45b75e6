/**
 * Key derivation: every key the protocol uses comes from HKDF-SHA-256 with the
 * job id as salt and a label naming its purpose, so that a secret used in one
 * job or for one purpose never yields a key for another.
 */
import { hkdfSync } from 'node:crypto';

const LABEL = 'dppa/secagg/v1/';

/** What a derived key is for. */
export type KeyPurpose = 'pairwise-mask' | 'self-mask' | 'share-box';

/** A 32-byte key for `purpose` in job `jobId` from input key material `ikm`. */
export function deriveKey(ikm: Uint8Array, jobId: string, purpose: KeyPurpose): Uint8Array {
  return new Uint8Array(hkdfSync('sha256', ikm, Buffer.from(jobId, 'utf8'), Buffer.from(LABEL + purpose, 'utf8'), 32));
}
