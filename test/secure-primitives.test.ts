import assert from 'node:assert/strict';
import { createCipheriv, createHmac, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import {
  FixedPointError,
  InconsistentSharesError,
  ProtocolStateError,
  ShareAuthError,
  addPrg,
  boxKey,
  combineShares,
  decodeSum,
  deriveKey,
  encodeFixed,
  fixedPoint,
  generateKeyPair,
  openBox,
  prgWords,
  publicKeyOf,
  sealBox,
  sharedSecret,
  splitSecret,
  spreadOnUnion,
  stepOf,
  sumErrorBound,
  unionSupport,
  unionStreams,
  UNION_SLICE,
  type PositionPiece,
} from '../proto/secure/index.js';

/** All subsets of `k` elements of `items`. */
function subsets<T>(items: readonly T[], k: number): T[][] {
  if (k === 0) return [[]];
  if (items.length < k) return [];
  const [first, ...rest] = items;
  return [...subsets(rest, k - 1).map((s) => [first!, ...s]), ...subsets(rest, k)];
}

describe('X25519', () => {
  it('gives both ends the same secret, another pair a different one, and the public key of a private key', () => {
    const a = generateKeyPair();
    const b = generateKeyPair();
    const c = generateKeyPair();
    assert.equal(a.publicKey.length, 32);
    assert.deepEqual(sharedSecret(a.privateKey, b.publicKey), sharedSecret(b.privateKey, a.publicKey));
    assert.notDeepEqual(sharedSecret(a.privateKey, b.publicKey), sharedSecret(a.privateKey, c.publicKey));
    assert.deepEqual(publicKeyOf(a.privateKey), a.publicKey);
  });

  it('refuses a low-order or malformed peer key', () => {
    const a = generateKeyPair();
    assert.throws(() => sharedSecret(a.privateKey, new Uint8Array(32)), ProtocolStateError);
    assert.throws(() => sharedSecret(a.privateKey, new Uint8Array(31)), ProtocolStateError);
  });
});

describe('known answers', () => {
  const hex = (h: string): Uint8Array => new Uint8Array(Buffer.from(h, 'hex'));

  it('X25519: RFC 7748 §6.1 (raw private keys in, raw public keys and shared secret out)', () => {
    const alice = hex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a');
    const bob = hex('5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb');
    const alicePublic = hex('8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a');
    const bobPublic = hex('de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f');
    const shared = hex('4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742');
    assert.deepEqual(publicKeyOf(alice), alicePublic);
    assert.deepEqual(publicKeyOf(bob), bobPublic);
    assert.deepEqual(sharedSecret(alice, bobPublic), shared);
    assert.deepEqual(sharedSecret(bob, alicePublic), shared);
  });

  it('HKDF-SHA-256: an HMAC-built HKDF gives RFC 5869 test case 1, and deriveKey agrees with it', () => {
    /** RFC 5869 §2.2-2.3 from HMAC-SHA-256. */
    const hkdf = (ikm: Uint8Array, salt: Uint8Array, info: Uint8Array, length: number): Uint8Array => {
      const prk = createHmac('sha256', salt).update(ikm).digest();
      const out: Buffer[] = [];
      let t = Buffer.alloc(0);
      for (let i = 1; out.length * 32 < length; i++) {
        t = createHmac('sha256', prk)
          .update(Buffer.concat([t, info, Buffer.from([i])]))
          .digest();
        out.push(t);
      }
      return new Uint8Array(Buffer.concat(out).subarray(0, length));
    };
    const okm = hkdf(hex('0b'.repeat(22)), hex('000102030405060708090a0b0c'), hex('f0f1f2f3f4f5f6f7f8f9'), 42);
    assert.deepEqual(okm, hex('3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865'));
    const ikm = randomBytes(32);
    for (const purpose of ['pairwise-mask', 'self-mask', 'share-box'] as const) {
      const expected = hkdf(ikm, Buffer.from('job-7', 'utf8'), Buffer.from(`dppa/secagg/v1/${purpose}`, 'utf8'), 32);
      assert.deepEqual(deriveKey(ikm, 'job-7', purpose), expected, purpose);
    }
  });
});

describe('PRG (AES-256-CTR keystream as uint32 words)', () => {
  it('is the AES-256-CTR keystream from counter 0, read little-endian', () => {
    const key = randomBytes(32);
    const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
    const stream = cipher.update(Buffer.alloc(4 * 37));
    const expected = Array.from({ length: 37 }, (_, i) => stream.readUInt32LE(4 * i));
    assert.deepEqual(Array.from(prgWords(key, 0, 37)), expected);
  });

  it('gives any range on its own the words of the whole stream, at any offset', () => {
    const key = randomBytes(32);
    const whole = prgWords(key, 0, (1 << 20) + 50);
    // Ranges across the 16384-word pieces the keystream is made in, and across cipher blocks.
    for (const [offset, count] of [
      [1, 7],
      [3, 1 << 20],
      [5, 13],
      [(1 << 14) - 3, 40000],
      [(1 << 20) - 2, 9],
      [4, 0],
    ] as const) {
      assert.deepEqual(prgWords(key, offset, count), whole.subarray(offset, offset + count), `offset ${offset}`);
    }
    assert.notDeepEqual(prgWords(randomBytes(32), 0, 16), whole.subarray(0, 16));
  });

  it('adds and subtracts modulo 2^32', () => {
    const key = randomBytes(32);
    const base = Uint32Array.from({ length: 1000 }, (_, i) => (i * 2654435761) >>> 0);
    const words = base.slice();
    addPrg(words, key, 10, 1);
    const ks = prgWords(key, 10, 1000);
    for (let i = 0; i < 1000; i++) assert.equal(words[i], (base[i]! + ks[i]!) % 2 ** 32);
    addPrg(words, key, 10, -1);
    assert.deepEqual(words, base);
  });
});

describe('fixed point in Z_2^32', () => {
  it('takes the largest power-of-two scale whose sum of n values within the bound cannot wrap', () => {
    for (const [bound, parties] of [
      [1, 3],
      [0.05, 5],
      [1000, 2],
      [3e-7, 10],
      [1e-290, 3],
      [1.7e308, 1],
      [0.5, 1000],
    ] as const) {
      const fp = fixedPoint(bound, parties);
      const k = fp.scaleBits;
      assert.equal(k, largestExactScale(bound, parties), `${bound}/${parties}`);
      // The extremes, summed as integers in Number arithmetic, stay within a signed 32-bit word.
      const top = Math.round(bound * 2 ** k);
      assert.ok(parties * top <= 2 ** 31 - 1, `${bound}/${parties}: ${parties}·${top}`);
      assert.equal(fixedPoint(1, 2 ** 31).scaleBits, largestExactScale(1, 2 ** 31));
      // n parties at +B and at −B: the sums decode without wrapping, within n·step/2.
      for (const sign of [1, -1]) {
        const sum = new Uint32Array(1);
        for (let p = 0; p < parties; p++) sum[0] = sum[0]! + encodeFixed([sign * bound], fp).words[0]!;
        const decoded = decodeSum(sum, fp)[0]!;
        assert.ok(Math.abs(decoded - sign * parties * bound) <= sumErrorBound(fp), `${decoded}`);
      }
    }
  });

  it('clips values beyond the bound and counts them; refuses NaN', () => {
    const fp = fixedPoint(0.5, 3);
    const { words, clipped } = encodeFixed([0.25, 0.7, -3, Infinity, -0.5, 0.5], fp);
    assert.equal(clipped, 3);
    const decoded = Array.from(decodeSum(words, fp));
    assert.deepEqual(decoded, [0.25, 0.5, -0.5, 0.5, -0.5, 0.5]);
    assert.throws(() => encodeFixed([1, NaN], fp), /NaN/);
    assert.throws(() => fixedPoint(0, 3), /bound/);
    assert.throws(() => fixedPoint(1, 0), /parties/);
  });

  it('refuses, without hanging, a bound or party count no power-of-two scale fits', () => {
    // 1e-320 and 1e-300 need a scale beyond 2^1023; 5e9 parties wrap on their rounding halves alone.
    for (const [bound, parties] of [
      [1e-320, 3],
      [1e-300, 3],
      [5e-324, 1],
      [1, 5e9],
      [1, 2 ** 32],
    ] as const) {
      assert.throws(() => fixedPoint(bound, parties), FixedPointError, `${bound}/${parties}`);
    }
    for (const [bound, parties] of [
      [NaN, 3],
      [Infinity, 3],
      [-1, 3],
      [1, 2.5],
      [1, NaN],
      [1, Infinity],
      [1, -2],
    ] as const) {
      assert.throws(() => fixedPoint(bound, parties), FixedPointError, `${bound}/${parties}`);
    }
  });

  it('rounds each value to within half a step', () => {
    const fp = fixedPoint(1, 4);
    const values = Float64Array.from({ length: 10000 }, () => Math.random() * 2 - 1);
    const decoded = decodeSum(encodeFixed(values, fp).words, fp);
    for (let i = 0; i < values.length; i++) assert.ok(Math.abs(decoded[i]! - values[i]!) <= stepOf(fp) / 2);
  });
});

describe('Shamir sharing over 2^127 − 1', () => {
  it('rebuilds a 32-byte secret from any t of n shares, and from all n', () => {
    const secret = randomBytes(32);
    const xs = [1, 2, 3, 4, 5];
    const shares = splitSecret(secret, 3, xs);
    for (const subset of subsets(shares, 3)) assert.deepEqual(Buffer.from(combineShares(subset, 3, 32)), secret);
    assert.deepEqual(Buffer.from(combineShares([...shares].reverse(), 3, 32)), secret);
  });

  it('t − 1 shares do not give the secret', () => {
    const secret = randomBytes(32);
    const shares = splitSecret(secret, 3, [1, 2, 3, 4, 5]);
    assert.throws(() => combineShares(shares.slice(0, 2), 3, 32), ProtocolStateError);
    // Interpolating t − 1 shares as if they were enough gives something else (or no secret of that length).
    for (const pair of subsets(shares, 2)) {
      try {
        assert.notDeepEqual(Buffer.from(combineShares(pair, 2, 32)), secret);
      } catch (err) {
        assert.ok(err instanceof InconsistentSharesError, String(err));
      }
    }
  });

  it('draws fresh polynomials: the shares of one secret differ run to run', () => {
    const a = splitSecret(new Uint8Array(32), 3, [1, 2, 3]);
    const b = splitSecret(new Uint8Array(32), 3, [1, 2, 3]);
    assert.notDeepEqual(a[0]!.y, b[0]!.y);
  });

  it('refuses a share that disagrees with the others', () => {
    const shares = splitSecret(randomBytes(32), 2, [1, 2, 3]);
    const bad = { x: 3, y: shares[2]!.y.slice() };
    bad.y[5]! ^= 1;
    // The wrong share may be the extra one or one of the basis: either way the message names no culprit.
    for (const set of [
      [shares[0]!, shares[1]!, bad],
      [bad, shares[0]!, shares[1]!],
    ]) {
      assert.throws(
        () => combineShares(set, 2, 32),
        (e: unknown) =>
          e instanceof InconsistentSharesError &&
          /^the revealed shares disagree/.test(e.message) &&
          !/share \d/.test(e.message),
      );
    }
    assert.throws(
      () => splitSecret(randomBytes(32), 1, [1, 2, 3]),
      ProtocolStateError,
      't = 1 shares the secret in clear',
    );
    assert.throws(() => combineShares(shares, 0, 32), ProtocolStateError);
    assert.throws(() => splitSecret(randomBytes(32), 4, [1, 2, 3]), ProtocolStateError);
    assert.throws(() => splitSecret(randomBytes(32), 2, [1, 1, 3]), ProtocolStateError);
  });
});

describe('share boxes (AES-256-GCM under an X25519-derived key)', () => {
  const a = generateKeyPair();
  const b = generateKeyPair();
  const c = generateKeyPair();
  const ctx = { jobId: 'job-1', sender: 1, recipient: 2, round: 1 };
  const plaintext = randomBytes(96);

  it('opens with the recipient key and the same context', () => {
    const box = sealBox(boxKey(a.privateKey, b.publicKey, 'job-1'), ctx, plaintext);
    assert.deepEqual(Buffer.from(openBox(boxKey(b.privateKey, a.publicKey, 'job-1'), ctx, box)), plaintext);
  });

  it('fails authentication when tampered, or for another job, recipient, sender, round or key', () => {
    const box = sealBox(boxKey(a.privateKey, b.publicKey, 'job-1'), ctx, plaintext);
    const key = boxKey(b.privateKey, a.publicKey, 'job-1');
    for (let i = 0; i < box.length; i += 7) {
      const bad = box.slice();
      bad[i]! ^= 0x10;
      assert.throws(() => openBox(key, ctx, bad), ShareAuthError, `byte ${i}`);
    }
    assert.throws(() => openBox(key, { ...ctx, jobId: 'job-2' }, box), ShareAuthError);
    assert.throws(
      () => openBox(boxKey(b.privateKey, a.publicKey, 'job-2'), { ...ctx, jobId: 'job-2' }, box),
      ShareAuthError,
    );
    assert.throws(() => openBox(key, { ...ctx, recipient: 3 }, box), ShareAuthError);
    assert.throws(() => openBox(key, { ...ctx, sender: 3 }, box), ShareAuthError);
    assert.throws(() => openBox(key, { ...ctx, round: 2 }, box), ShareAuthError);
    assert.throws(
      () => openBox(boxKey(c.privateKey, a.publicKey, 'job-1'), { ...ctx, recipient: 3 }, box),
      ShareAuthError,
    );
    assert.throws(() => openBox(key, ctx, box.subarray(0, 20)), ShareAuthError);
  });
});

describe('supports', () => {
  it('unites sorted supports and lays a party’s values on the union', () => {
    const s1 = Uint32Array.of(1, 5, 9);
    const s2 = Uint32Array.of(0, 5, 7, 12);
    const union = unionSupport([s1, s2, new Uint32Array(0)]);
    assert.deepEqual(Array.from(union), [0, 1, 5, 7, 9, 12]);
    assert.deepEqual(Array.from(spreadOnUnion(union, s1, [0.5, -1, 2])), [0, 0.5, -1, 0, 2, 0]);
    assert.throws(() => spreadOnUnion(union, Uint32Array.of(2), [1]), ProtocolStateError);
    assert.throws(() => unionSupport([Uint32Array.of(3, 3)]), ProtocolStateError);
  });

  it('unites streams of pieces a window at a time with pauses between, and finds disorder across pieces', async () => {
    // Every 2nd and every 7th position below 3·UNION_SLICE in pieces of 1000 positions, runs of 100 positions every
    // 1000 as RANGE pieces (the positions they imply), and one range beyond: longer than a window together.
    const limit = 3 * UNION_SLICE;
    const every = (k: number): Uint32Array => Uint32Array.from({ length: Math.ceil(limit / k) }, (_, i) => i * k);
    // Each piece handed over after a turn of the microtask queue, as a file's reader does.
    async function* stream(items: Iterable<PositionPiece>): AsyncGenerator<PositionPiece> {
      for (const item of items) yield await Promise.resolve(item);
    }
    function* pieces(s: Uint32Array, size = 1000): Generator<PositionPiece> {
      for (let i = 0; i < s.length; i += size) {
        const part = s.subarray(i, i + size);
        yield { first: 0, count: part.length, positions: part };
      }
    }
    function* runs(): Generator<PositionPiece> {
      for (let x = 0; x < limit; x += 1000) yield { first: x, count: 100, positions: undefined };
    }
    let pauses = 0;
    const pause = (): Promise<void> => {
      pauses++;
      return new Promise((resolve) => setImmediate(resolve));
    };
    const written: Uint32Array[] = [];
    const write = (w: Uint32Array): Promise<void> => {
      written.push(w.slice());
      return Promise.resolve();
    };
    const range = (): AsyncGenerator<PositionPiece> => stream([{ first: limit + 5, count: 10, positions: undefined }]);
    const total = await unionStreams(
      [stream(pieces(every(2))), stream(runs()), stream(pieces(every(7))), range()],
      write,
      pause,
    );
    const expected: number[] = [];
    for (let x = 0; x < limit; x++) if (x % 2 === 0 || x % 1000 < 100 || x % 7 === 0) expected.push(x);
    for (let x = limit + 5; x < limit + 15; x++) expected.push(x);
    assert.equal(total, expected.length);
    assert.ok(written.slice(0, -1).every((w) => w.length === UNION_SLICE));
    let at = 0;
    for (const w of written) for (const x of w) assert.ok(x === expected[at++], `position ${at - 1}`);
    assert.equal(at, expected.length);
    assert.equal(written.length, Math.ceil(total / UNION_SLICE));
    assert.ok(pauses >= written.length - 1, `${pauses} pauses`);
    // A position repeated across two pieces of one stream, at index UNION_SLICE of it: the last of one piece of 1024
    // and the first of the next (pieces of 1000 would hold both).
    const bad = every(1);
    bad[UNION_SLICE] = bad[UNION_SLICE - 1]!;
    assert.equal(UNION_SLICE % 1024, 0);
    await assert.rejects(
      unionStreams([stream(pieces(bad, 1024))], write, pause),
      (e: unknown) => e instanceof ProtocolStateError && e.message.includes(`at ${UNION_SLICE}`),
    );
    await assert.rejects(
      unionStreams(
        [
          range(),
          stream(pieces(Uint32Array.of(1, 2))),
          stream([{ first: 2 ** 32 - 1, count: 2, positions: undefined }]),
        ],
        write,
        pause,
      ),
      (e: unknown) => e instanceof ProtocolStateError && /support 2: position 4294967296 is beyond/.test(e.message),
    );
  });

  it('closes every stream after an error, whatever one closing throws, and keeps the error', async () => {
    const piece = (...xs: number[]): PositionPiece => ({ first: 0, count: xs.length, positions: xs });
    const closed: string[] = [];
    async function* failing(): AsyncGenerator<PositionPiece> {
      yield await Promise.resolve(piece(0));
      throw new Error('read failed');
    }
    // Suspended after their first piece when the first stream fails: return() runs their finally.
    async function* refusingClose(): AsyncGenerator<PositionPiece> {
      try {
        yield await Promise.resolve(piece(1, 5));
        yield piece(6);
      } finally {
        closed.push('refusing');
        // eslint-disable-next-line no-unsafe-finally -- a stream whose closing fails, as under test
        throw new Error('close failed');
      }
    }
    async function* closing(): AsyncGenerator<PositionPiece> {
      try {
        yield await Promise.resolve(piece(2, 7));
        yield piece(8);
      } finally {
        closed.push('closing');
      }
    }
    const none = (): Promise<void> => Promise.resolve();
    await assert.rejects(unionStreams([failing(), refusingClose(), closing()], none, none), /^Error: read failed$/);
    assert.deepEqual(closed.sort(), ['closing', 'refusing']);
    // With no error before, a failing closing is thrown (after every stream was closed).
    closed.length = 0;
    const done = {
      [Symbol.asyncIterator]: () => ({
        next: () => Promise.resolve({ done: true as const, value: undefined }),
        return: () => Promise.reject(new Error('close failed')),
      }),
    };
    await assert.rejects(unionStreams([done, closing()], none, none), /^Error: close failed$/);
    assert.deepEqual(closed, ['closing']);
  });
});

/** A double as an exact M·2^E with integer M. */
function exactDouble(x: number): { m: bigint; e: number } {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const bits = view.getBigUint64(0);
  const exp = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & ((1n << 52n) - 1n);
  return exp === 0 ? { m: frac, e: -1074 } : { m: frac | (1n << 52n), e: exp - 1075 };
}

/**
 * The largest k in [−1074, 1023] with n·(B·2^k + ½) < 2^31 − 1, found by trying every k in exact
 * integer arithmetic: 2n·M·2^(E+k) + n < 2^32 − 2. Undefined when none does, or when 2^1024 would too.
 */
function largestExactScale(bound: number, parties: number): number | undefined {
  const { m, e } = exactDouble(bound);
  const n = BigInt(parties);
  const fits = (k: number): boolean => {
    const s = e + k + 1;
    return s >= 0
      ? ((n * m) << BigInt(s)) + n < 2n ** 32n - 2n
      : n * m + (n << BigInt(-s)) < (2n ** 32n - 2n) << BigInt(-s);
  };
  if (fits(1024)) return undefined;
  for (let k = 1023; k >= -1074; k--) if (fits(k)) return k;
  return undefined;
}
