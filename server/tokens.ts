/**
 * Bearer tokens of parties: 32 random bytes, base64url, stored only as a
 * SHA-256 hash (a leaked job.json reveals no usable token).
 */
import { createHash, randomBytes } from 'node:crypto';

/** A new party token and the hash to store. */
export function newPartyToken(): { token: string; sha256: string } {
  const token = randomId(32);
  return { token, sha256: hashToken(token) };
}

/**
 * `bytes` random bytes as base64url, drawn again while the text starts with
 * `-`: command-line parsers take `--token -x…` or `--job -x…` for an option
 * (one id in 64 would otherwise need `--token=-x…`).
 */
export function randomId(bytes: number): string {
  for (;;) {
    const id = randomBytes(bytes).toString('base64url');
    if (!id.startsWith('-')) return id;
  }
}

/** Lower-case hex SHA-256 of a token. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}
