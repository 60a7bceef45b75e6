/**
 * Bearer tokens of parties: 32 random bytes, base64url, stored only as a
 * SHA-256 hash (a leaked job.json reveals no usable token).
 */
import { createHash, randomBytes } from 'node:crypto';

/** A new party token and the hash to store. */
export function newPartyToken(): { token: string; sha256: string } {
  const token = randomBytes(32).toString('base64url');
  return { token, sha256: hashToken(token) };
}

/** Lower-case hex SHA-256 of a token. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}
