/**
 * Share encryption: the shares a party sends another, sealed with AES-256-GCM
 * under a key derived (HKDF) from the X25519 secret of their share keys. The
 * associated data binds the job id, sender, recipient and round, so a box
 * replayed from another job or round, delivered to another party or altered
 * fails authentication. A box is version (1 byte) ‖ nonce (12) ‖ ciphertext ‖ tag (16).
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { deriveKey } from './derive.js';
import { ShareAuthError } from './errors.js';
import { sharedSecret } from './x25519.js';

const VERSION = 1;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
/** Bytes a box adds to its plaintext. */
export const BOX_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES;

/** Who sends a box to whom, in which job and round: bound into its authentication. */
export interface BoxContext {
  jobId: string;
  sender: number;
  recipient: number;
  round: number;
}

/** The box key between a party's share private key and a peer's share public key (the same from both ends). */
export function boxKey(privateKey: Uint8Array, peerPublicKey: Uint8Array, jobId: string): Uint8Array {
  return deriveKey(sharedSecret(privateKey, peerPublicKey), jobId, 'share-box');
}

function associatedData(ctx: BoxContext): Buffer {
  const job = Buffer.from(ctx.jobId, 'utf8');
  const head = Buffer.from('dppa/secagg/v1/share-box\0', 'utf8');
  const tail = Buffer.alloc(4 + 4 + 4 + 4);
  tail.writeUInt32BE(job.length, 0);
  tail.writeUInt32BE(ctx.sender, 4);
  tail.writeUInt32BE(ctx.recipient, 8);
  tail.writeUInt32BE(ctx.round, 12);
  return Buffer.concat([head, tail.subarray(0, 4), job, tail.subarray(4)]);
}

/** Seals `plaintext` from `ctx.sender` to `ctx.recipient`. */
export function sealBox(key: Uint8Array, ctx: BoxContext, plaintext: Uint8Array): Uint8Array {
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(associatedData(ctx));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return new Uint8Array(Buffer.concat([Buffer.of(VERSION), nonce, body, cipher.getAuthTag()]));
}

/**
 * Opens a box.
 * @throws ShareAuthError if it is malformed or fails authentication for this key and context
 */
export function openBox(key: Uint8Array, ctx: BoxContext, box: Uint8Array): Uint8Array {
  if (box.length < BOX_OVERHEAD || box[0] !== VERSION) throw new ShareAuthError(ctx.sender, 'malformed share box');
  const nonce = box.subarray(1, 1 + NONCE_BYTES);
  const tag = box.subarray(box.length - TAG_BYTES);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(associatedData(ctx));
  decipher.setAuthTag(tag);
  try {
    const plain = Buffer.concat([
      decipher.update(box.subarray(1 + NONCE_BYTES, box.length - TAG_BYTES)),
      decipher.final(),
    ]);
    return new Uint8Array(plain);
  } catch (cause) {
    throw new ShareAuthError(
      ctx.sender,
      `authentication failed (job ${ctx.jobId}, recipient ${ctx.recipient}, round ${ctx.round})`,
      { cause },
    );
  }
}
