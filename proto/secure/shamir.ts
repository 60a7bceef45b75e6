/**
 * Shamir secret sharing over the prime field of p = 2^127 − 1. A secret of
 * bytes is cut into 15-byte pieces (each below 2^120 < p), and each piece is
 * the constant term of its own random polynomial of degree t − 1; share x
 * holds every polynomial's value at x, 16 bytes big-endian each. Any t shares
 * give the secret back; t − 1 shares are uniform whatever the secret.
 */
import { randomBytes } from 'node:crypto';
import { InconsistentSharesError, ProtocolStateError } from './errors.js';

/** The field's prime, 2^127 − 1. */
export const PRIME = (1n << 127n) - 1n;
const PIECE_BYTES = 15;
const ELEMENT_BYTES = 16;

/** One share: the evaluation point x (a party's index, ≥ 1) and the values there. */
export interface ShamirShare {
  x: number;
  /** The values of every piece's polynomial at x, 16 bytes big-endian each. */
  y: Uint8Array;
}

/** Bytes of a share's `y` for a secret of `secretBytes` bytes. */
export function shareBytes(secretBytes: number): number {
  return Math.ceil(secretBytes / PIECE_BYTES) * ELEMENT_BYTES;
}

function mod(a: bigint): bigint {
  const r = a % PRIME;
  return r < 0n ? r + PRIME : r;
}

function toBigint(bytes: Uint8Array): bigint {
  let v = 0n;
  for (const b of bytes) v = (v << 8n) | BigInt(b);
  return v;
}

function toBytes(v: bigint, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = length - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

/** A uniform field element (rejection sampling on 127 random bits). */
function randomElement(): bigint {
  for (;;) {
    const v = toBigint(randomBytes(ELEMENT_BYTES)) >> 1n;
    if (v < PRIME) return v;
  }
}

function inverse(a: bigint): bigint {
  // Fermat: a^(p−2) = a^−1 mod p.
  let result = 1n;
  let base = mod(a);
  for (let e = PRIME - 2n; e > 0n; e >>= 1n) {
    if (e & 1n) result = (result * base) % PRIME;
    base = (base * base) % PRIME;
  }
  return result;
}

function checkPoints(xs: readonly number[], what: string): void {
  const seen = new Set<number>();
  for (const x of xs) {
    if (!Number.isSafeInteger(x) || x < 1)
      throw new ProtocolStateError(`${what}: share point ${x} is not a positive integer`);
    if (seen.has(x)) throw new ProtocolStateError(`${what}: share point ${x} twice`);
    seen.add(x);
  }
}

/**
 * Shares `secret` among points `xs` (distinct positive integers) with threshold `threshold`.
 * @throws ProtocolStateError for a threshold outside [1, xs.length] or bad points
 */
export function splitSecret(secret: Uint8Array, threshold: number, xs: readonly number[]): ShamirShare[] {
  // t = 1 would make every share the secret itself.
  if (!Number.isInteger(threshold) || threshold < 2 || threshold > xs.length) {
    throw new ProtocolStateError(`threshold ${threshold} for ${xs.length} shares (2 ≤ t ≤ n)`);
  }
  checkPoints(xs, 'split');
  const pieces = Math.ceil(secret.length / PIECE_BYTES);
  const shares = xs.map((x) => ({ x, y: new Uint8Array(pieces * ELEMENT_BYTES) }));
  for (let p = 0; p < pieces; p++) {
    const coefficients = [toBigint(secret.subarray(p * PIECE_BYTES, (p + 1) * PIECE_BYTES))];
    for (let d = 1; d < threshold; d++) coefficients.push(randomElement());
    for (const share of shares) {
      const x = BigInt(share.x);
      let y = 0n;
      for (let d = coefficients.length - 1; d >= 0; d--) y = (y * x + coefficients[d]!) % PRIME;
      share.y.set(toBytes(y, ELEMENT_BYTES), p * ELEMENT_BYTES);
    }
  }
  return shares;
}

/** The value at `at` of the polynomial through `points` (Lagrange interpolation). */
function interpolate(points: readonly { x: bigint; y: bigint }[], at: bigint): bigint {
  let sum = 0n;
  for (let i = 0; i < points.length; i++) {
    let num = 1n;
    let den = 1n;
    for (let j = 0; j < points.length; j++) {
      if (j === i) continue;
      num = (num * mod(at - points[j]!.x)) % PRIME;
      den = (den * mod(points[i]!.x - points[j]!.x)) % PRIME;
    }
    sum = (sum + points[i]!.y * ((num * inverse(den)) % PRIME)) % PRIME;
  }
  return sum;
}

/**
 * The secret of `secretBytes` bytes from at least `threshold` shares. The first
 * `threshold` shares define each polynomial; every further share must lie on it.
 * @throws ProtocolStateError for a threshold below 1, too few shares, bad points or sizes
 * @throws InconsistentSharesError if the shares do not lie on one polynomial (some share is wrong; with
 *   exactly `threshold` shares a wrong one is not detected)
 */
export function combineShares(shares: readonly ShamirShare[], threshold: number, secretBytes: number): Uint8Array {
  if (!Number.isInteger(threshold) || threshold < 1)
    throw new ProtocolStateError(`threshold ${threshold}: expected an integer ≥ 1`);
  if (shares.length < threshold) throw new ProtocolStateError(`${shares.length} shares, the threshold is ${threshold}`);
  checkPoints(
    shares.map((s) => s.x),
    'combine',
  );
  const pieces = Math.ceil(secretBytes / PIECE_BYTES);
  for (const s of shares) {
    if (s.y.length !== pieces * ELEMENT_BYTES)
      throw new ProtocolStateError(`share ${s.x}: ${s.y.length} bytes, expected ${pieces * ELEMENT_BYTES}`);
  }
  const secret = new Uint8Array(secretBytes);
  for (let p = 0; p < pieces; p++) {
    const points = shares.map((s) => {
      const y = toBigint(s.y.subarray(p * ELEMENT_BYTES, (p + 1) * ELEMENT_BYTES));
      if (y >= PRIME) throw new ProtocolStateError(`share ${s.x}: value not in the field`);
      return { x: BigInt(s.x), y };
    });
    const basis = points.slice(0, threshold);
    for (const extra of points.slice(threshold)) {
      // Which share is wrong is not known here (it may be one of the basis): only that they disagree.
      if (interpolate(basis, extra.x) !== extra.y)
        throw new InconsistentSharesError('the revealed shares disagree: at least one of them is wrong');
    }
    const pieceBytes = Math.min(PIECE_BYTES, secretBytes - p * PIECE_BYTES);
    const value = interpolate(basis, 0n);
    if (value >= 1n << BigInt(8 * pieceBytes))
      throw new InconsistentSharesError('the shares do not encode a secret of this length');
    secret.set(toBytes(value, pieceBytes), p * PIECE_BYTES);
  }
  return secret;
}
