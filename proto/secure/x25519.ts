/**
 * X25519 key pairs as raw 32-byte keys (what travels in messages and sits in
 * state) and the Diffie-Hellman shared secret between two of them.
 */
import { createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { ProtocolStateError } from './errors.js';

/** DER prefixes of an X25519 SubjectPublicKeyInfo and PKCS#8 key; the raw 32 bytes follow. */
const SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
const PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');

/** Length of a raw X25519 key and of a shared secret. */
export const KEY_BYTES = 32;

/** A raw X25519 key pair. */
export interface KeyPair {
  publicKey: Uint8Array;
  privateKey: Uint8Array;
}

function checkLength(key: Uint8Array, what: string): void {
  if (key.length !== KEY_BYTES) throw new ProtocolStateError(`${what}: expected ${KEY_BYTES} bytes, got ${key.length}`);
}

function rawPublic(key: KeyObject): Uint8Array {
  return new Uint8Array(key.export({ type: 'spki', format: 'der' }).subarray(SPKI_PREFIX.length));
}

function privateObject(privateKey: Uint8Array): KeyObject {
  checkLength(privateKey, 'X25519 private key');
  return createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, privateKey]), format: 'der', type: 'pkcs8' });
}

function publicObject(publicKey: Uint8Array): KeyObject {
  checkLength(publicKey, 'X25519 public key');
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, publicKey]), format: 'der', type: 'spki' });
}

/** A fresh key pair. */
export function generateKeyPair(): KeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('x25519');
  const der = privateKey.export({ type: 'pkcs8', format: 'der' });
  return { publicKey: rawPublic(publicKey), privateKey: new Uint8Array(der.subarray(PKCS8_PREFIX.length)) };
}

/** The public key of a raw private key. */
export function publicKeyOf(privateKey: Uint8Array): Uint8Array {
  return rawPublic(createPublicKey(privateObject(privateKey)));
}

/**
 * The X25519 shared secret of `privateKey` and a peer's `publicKey`.
 * @throws ProtocolStateError for a malformed key or a low-order peer key (all-zero secret)
 */
export function sharedSecret(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  let secret: Buffer;
  try {
    secret = diffieHellman({ privateKey: privateObject(privateKey), publicKey: publicObject(publicKey) });
  } catch (cause) {
    if (cause instanceof ProtocolStateError) throw cause;
    throw new ProtocolStateError('X25519: the peer public key is not usable', { cause });
  }
  if (secret.every((b) => b === 0)) throw new ProtocolStateError('X25519: the peer public key has low order');
  return new Uint8Array(secret);
}
