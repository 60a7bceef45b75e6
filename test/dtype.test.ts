import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  bf16ToF32,
  bytesPerElement,
  decodeToF32,
  encodeFromF32,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
} from '../proto/safetensors/index.js';

// ---------------------------------------------------------------------------
// Slow reference conversions written from the IEEE 754 definitions, working on
// exact double values rather than bit tricks, to check the fast paths.
// ---------------------------------------------------------------------------

interface Format {
  expBits: number;
  mantBits: number;
}
const F16: Format = { expBits: 5, mantBits: 10 };
const BF16: Format = { expBits: 8, mantBits: 7 };
const F32: Format = { expBits: 8, mantBits: 23 };

function floorLog2(x: number): number {
  let e = Math.floor(Math.log2(x));
  while (2 ** e > x) e--;
  while (2 ** (e + 1) <= x) e++;
  return e;
}

/** Value of a bit pattern of `fmt` (NaN for NaNs). */
function refDecode(bits: number, fmt: Format): number {
  const bias = 2 ** (fmt.expBits - 1) - 1;
  const sign = Math.floor(bits / 2 ** (fmt.expBits + fmt.mantBits)) % 2 === 1 ? -1 : 1;
  const exp = Math.floor(bits / 2 ** fmt.mantBits) % 2 ** fmt.expBits;
  const mant = bits % 2 ** fmt.mantBits;
  if (exp === 2 ** fmt.expBits - 1) return mant === 0 ? sign * Infinity : NaN;
  if (exp === 0) return sign * mant * 2 ** (1 - bias - fmt.mantBits);
  return sign * (1 + mant / 2 ** fmt.mantBits) * 2 ** (exp - bias);
}

/** Bit pattern of `fmt` nearest to `v` (ties to even); `v` must not be NaN. */
function refEncode(v: number, fmt: Format): number {
  const bias = 2 ** (fmt.expBits - 1) - 1;
  const signBit = v < 0 || Object.is(v, -0) ? 2 ** (fmt.expBits + fmt.mantBits) : 0;
  const infBits = signBit + (2 ** fmt.expBits - 1) * 2 ** fmt.mantBits;
  const a = Math.abs(v);
  if (a === Infinity) return infBits;
  if (a === 0) return signBit;
  const emin = 1 - bias;
  const e = Math.max(floorLog2(a), emin);
  const quantum = 2 ** (e - fmt.mantBits);
  const q = a / quantum;
  let r = Math.floor(q);
  const frac = q - r;
  if (frac > 0.5 || (frac === 0.5 && r % 2 === 1)) r++;
  const rounded = r * quantum;
  if (rounded >= 2 ** (bias + 1)) return infBits;
  if (rounded < 2 ** emin) return signBit + rounded / 2 ** (emin - fmt.mantBits);
  const e2 = floorLog2(rounded);
  const mant = rounded / 2 ** (e2 - fmt.mantBits) - 2 ** fmt.mantBits;
  return signBit + (e2 + bias) * 2 ** fmt.mantBits + mant;
}

/** Narrowing of an F32 bit pattern: NaNs keep sign and top payload bits, quiet bit set. */
function refNarrow(bits: number, to: Format): number {
  const v = refDecode(bits, F32);
  if (!Number.isNaN(v)) return refEncode(v, to);
  const sign = bits >= 0x80000000 ? 2 ** (to.expBits + to.mantBits) : 0;
  const payload = Math.floor((bits % 2 ** 23) / 2 ** (23 - to.mantBits));
  const quiet = 2 ** (to.mantBits - 1);
  return sign + (2 ** to.expBits - 1) * 2 ** to.mantBits + (payload | quiet);
}

/** Widening to F32: exact, NaN payload carried bit for bit. */
function refWiden(bits: number, from: Format): number {
  const v = refDecode(bits, from);
  if (!Number.isNaN(v)) return new Uint32Array(new Float32Array([v]).buffer)[0]!;
  const total = from.expBits + from.mantBits;
  const sign = Math.floor(bits / 2 ** total) === 1 ? 0x80000000 : 0;
  return sign + 0x7f800000 + (bits % 2 ** from.mantBits) * 2 ** (23 - from.mantBits);
}

function f32Bits(words: number[]): Float32Array {
  return new Float32Array(new Uint32Array(words).buffer);
}
function bitsOf(a: Float32Array): number[] {
  return [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
}
const hex = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;

/** xorshift32, so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

void describe('dtype sizes', () => {
  void it('gives bytes per element', () => {
    assert.equal(bytesPerElement('F32'), 4);
    assert.equal(bytesPerElement('F16'), 2);
    assert.equal(bytesPerElement('BF16'), 2);
  });
});

void describe('f32 → bf16 (hand-computed)', () => {
  const cases: [number, number, string][] = [
    [0x3f808000, 0x3f80, 'tie, kept LSB even: stays'],
    [0x3f818000, 0x3f82, 'tie, kept LSB odd: rounds up'],
    [0x3f808001, 0x3f81, 'just above half'],
    [0x3f807fff, 0x3f80, 'just below half'],
    [0x3f800000, 0x3f80, '1.0 exact'],
    [0xbf818000, 0xbf82, 'negative tie to even'],
    [0x80000000, 0x8000, '-0'],
    [0x00000000, 0x0000, '+0'],
    [0x7f800000, 0x7f80, '+inf'],
    [0xff800000, 0xff80, '-inf'],
    [0x7f7f7fff, 0x7f7f, 'max finite bf16 stays'],
    [0x7f7f8000, 0x7f80, 'halfway above max finite (odd) rounds to inf'],
    [0x7f7fffff, 0x7f80, 'f32 max overflows to inf'],
    [0x7fc00000, 0x7fc0, 'quiet NaN'],
    [0x7f800001, 0x7fc0, 'NaN with low payload only stays NaN, not inf'],
    [0xff800001, 0xffc0, 'negative NaN keeps sign'],
    [0x7fa00000, 0x7fe0, 'signalling NaN quieted, payload kept'],
    [0x00018000, 0x0002, 'f32 subnormal tie rounds to even'],
    [0x00000001, 0x0000, 'tiny subnormal rounds to zero'],
  ];
  for (const [input, expected, why] of cases) {
    void it(`${hex(input)} → ${hex(expected)} (${why})`, () => {
      assert.equal(hex(f32ToBf16(f32Bits([input]))[0]!), hex(expected));
    });
  }
});

void describe('f32 → f16 (hand-computed)', () => {
  const cases: [number, number, string][] = [
    [0x3f800000, 0x3c00, '1.0'],
    [0xc0000000, 0xc000, '-2.0'],
    [0x3f801000, 0x3c00, '1 + 2^-11 ties to even (down)'],
    [0x3f803000, 0x3c02, '1 + 3·2^-11 ties to even (up)'],
    [0x3f801001, 0x3c01, 'just above half rounds up'],
    [0x477fe000, 0x7bff, '65504 = max finite'],
    [0x477fef00, 0x7bff, '65519 rounds down to max'],
    [0x477ff000, 0x7c00, '65520 ties to even: infinity'],
    [0x49742400, 0x7c00, '1e6 overflows'],
    [0xc9742400, 0xfc00, '-1e6 overflows to -inf'],
    [0x7f7fffff, 0x7c00, 'f32 max overflows'],
    [0x7f800000, 0x7c00, '+inf'],
    [0xff800000, 0xfc00, '-inf'],
    [0x38800000, 0x0400, '2^-14 = min normal'],
    [0x387fc000, 0x03ff, '1023·2^-24 = max subnormal'],
    [0x387fe000, 0x0400, '1023.5·2^-24 ties up to min normal'],
    [0x33800000, 0x0001, '2^-24 = min subnormal'],
    [0x33000000, 0x0000, '2^-25 ties to even: zero'],
    [0x33000001, 0x0001, 'just above 2^-25 rounds up'],
    [0x33c00000, 0x0002, '1.5·2^-24 ties to even: 2'],
    [0x34200000, 0x0002, '2.5·2^-24 ties to even: 2'],
    [0xb3800000, 0x8001, '-2^-24'],
    [0x2f800000, 0x0000, '2^-32 underflows to zero'],
    [0x80000000, 0x8000, '-0'],
    [0x7fc00000, 0x7e00, 'quiet NaN'],
    [0xff800001, 0xfe00, 'negative NaN with low payload stays NaN'],
    [0x7f802000, 0x7e01, 'NaN payload top bits kept, quieted'],
  ];
  for (const [input, expected, why] of cases) {
    void it(`${hex(input)} → ${hex(expected)} (${why})`, () => {
      assert.equal(hex(f32ToF16(f32Bits([input]))[0]!), hex(expected));
    });
  }
});

void describe('widening (hand-computed)', () => {
  void it('f16 → f32', () => {
    const src = new Uint16Array([
      0x0001, 0x03ff, 0x0400, 0x7bff, 0x7c00, 0xfc00, 0x8000, 0x7e00, 0x7c01, 0x3c00, 0xc000, 0x8001,
    ]);
    assert.deepEqual(
      bitsOf(f16ToF32(src)).map(hex),
      [
        0x33800000, 0x387fc000, 0x38800000, 0x477fe000, 0x7f800000, 0xff800000, 0x80000000, 0x7fc00000, 0x7f802000,
        0x3f800000, 0xc0000000, 0xb3800000,
      ].map(hex),
    );
  });
  void it('bf16 → f32', () => {
    const src = new Uint16Array([0x3f80, 0xff80, 0x0001, 0x8000, 0x7fc1, 0x7f7f]);
    assert.deepEqual(
      bitsOf(bf16ToF32(src)).map(hex),
      [0x3f800000, 0xff800000, 0x00010000, 0x80000000, 0x7fc10000, 0x7f7f0000].map(hex),
    );
  });
});

void describe('property: fast paths agree with the reference', () => {
  void it('widening is exact for every one of the 65536 f16 and bf16 patterns', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const f16 = bitsOf(f16ToF32(all));
    const bf16 = bitsOf(bf16ToF32(all));
    for (let h = 0; h < 65536; h++) {
      if (f16[h] !== refWiden(h, F16)) assert.fail(`f16 ${hex(h)}: got ${hex(f16[h]!)}, want ${hex(refWiden(h, F16))}`);
      if (bf16[h] !== refWiden(h, BF16))
        assert.fail(`bf16 ${hex(h)}: got ${hex(bf16[h]!)}, want ${hex(refWiden(h, BF16))}`);
    }
  });

  void it('narrowing matches on random bit patterns, ties and edge exponents', () => {
    const seed = 0x5eed1234;
    const next = rng(seed);
    const n = 200_000;
    const words = new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      let w = next();
      const kind = i % 4;
      // Pure random bits almost never hit an exact tie or the f16 edge
      // exponents, so steer some of them there.
      if (kind === 1) w = (w & 0xffff0000) | 0x8000;
      if (kind === 2) w = (w & 0xffffe000) | 0x1000;
      if (kind === 3) w = (w & 0x807fffff) | ((96 + (next() % 50)) << 23);
      words[i] = w;
    }
    const values = new Float32Array(words.buffer);
    const bf = f32ToBf16(values);
    const h = f32ToF16(values);
    for (let i = 0; i < n; i++) {
      const w = words[i]!;
      if (bf[i] !== refNarrow(w, BF16))
        assert.fail(`seed ${hex(seed)}: bf16 of ${hex(w)} got ${hex(bf[i]!)}, want ${hex(refNarrow(w, BF16))}`);
      if (h[i] !== refNarrow(w, F16))
        assert.fail(`seed ${hex(seed)}: f16 of ${hex(w)} got ${hex(h[i]!)}, want ${hex(refNarrow(w, F16))}`);
    }
  });

  void it('narrowing then widening round-trips every non-NaN f16 and bf16 value', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const back16 = f32ToF16(f16ToF32(all));
    const backB = f32ToBf16(bf16ToF32(all));
    for (let x = 0; x < 65536; x++) {
      if ((x & 0x7fff) <= 0x7c00) assert.equal(back16[x], x, `f16 ${hex(x)}`);
      if ((x & 0x7fff) <= 0x7f80) assert.equal(backB[x], x, `bf16 ${hex(x)}`);
    }
  });
});

void describe('decodeToF32 / encodeFromF32', () => {
  const values = new Float32Array([1, -2.5, 0.1, 65504, -0, Infinity]);

  void it('decodes every dtype from little-endian bytes', () => {
    assert.deepEqual([...decodeToF32(new Uint8Array([0x00, 0x3c, 0x00, 0xc0]), 'F16')], [1, -2]);
    assert.deepEqual([...decodeToF32(new Uint8Array([0x80, 0x3f, 0x20, 0xc1]), 'BF16')], [1, -10]);
    assert.deepEqual([...decodeToF32(new Uint8Array([0, 0, 0xc0, 0x3f]), 'F32')], [1.5]);
  });

  void it('handles byte views at odd offsets by copying', () => {
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const enc = encodeFromF32(values, dtype);
      const shifted = new Uint8Array(enc.byteLength + 1);
      shifted.set(enc, 1);
      const view = shifted.subarray(1);
      assert.equal(view.byteOffset % 2, 1);
      assert.deepEqual(bitsOf(decodeToF32(view, dtype)), bitsOf(decodeToF32(enc.slice(), dtype)), dtype);
      // A Buffer too (a protobuf bytes field decoded from a received message): its own slice() makes no copy.
      const buffer = Buffer.from(shifted.buffer, 1, enc.byteLength);
      assert.deepEqual(
        bitsOf(decodeToF32(buffer, dtype)),
        bitsOf(decodeToF32(enc.slice(), dtype)),
        `${dtype} from a Buffer`,
      );
    }
  });

  void it('encodes and decodes back (exact for representable values)', () => {
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const back = decodeToF32(encodeFromF32(values, dtype).slice(), dtype);
      assert.equal(back.length, values.length);
      assert.ok(Object.is(back[4], -0), `${dtype} keeps -0`);
      assert.equal(back[5], Infinity);
      assert.equal(back[0], 1);
    }
    assert.equal(decodeToF32(encodeFromF32(values, 'BF16').slice(), 'BF16')[2], 0.10009765625);
    assert.equal(decodeToF32(encodeFromF32(values, 'F16').slice(), 'F16')[2], 0.0999755859375);
  });

  void it('writes into a caller-provided destination', () => {
    const dst = new Float32Array(4).fill(7);
    const out = decodeToF32(new Uint8Array([0x80, 0x3f, 0x00, 0x40]), 'BF16', dst);
    assert.equal(out, dst);
    assert.deepEqual([...dst], [1, 2, 7, 7]);
    const dst32 = new Float32Array(1);
    decodeToF32(new Uint8Array([0, 0, 0x80, 0x3f]), 'F32', dst32);
    assert.equal(dst32[0], 1);
  });

  void it('encodes into the start of a caller-provided block, as into new memory', () => {
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const block = new Uint8Array(values.length * 4 + 16).fill(0xab);
      const into = encodeFromF32(values, dtype, block);
      assert.equal(into.buffer, block.buffer, dtype);
      assert.equal(into.byteOffset, 0, dtype);
      assert.deepEqual([...into], [...encodeFromF32(values, dtype).slice()], dtype);
      assert.equal(block[into.byteLength], 0xab, `${dtype}: nothing written past the result`);
    }
    assert.throws(() => encodeFromF32(values, 'BF16', new Uint8Array(values.length * 2 - 1)), RangeError);
  });

  void it('rejects lengths that are not whole elements and short destinations', () => {
    assert.throws(() => decodeToF32(new Uint8Array(3), 'F16'), RangeError);
    assert.throws(() => decodeToF32(new Uint8Array(6), 'F32'), RangeError);
    assert.throws(() => decodeToF32(new Uint8Array(8), 'BF16', new Float32Array(3)), RangeError);
  });

  void it('widens in place when the source sits in the upper half of the destination', () => {
    const n = 1001;
    const buf = new ArrayBuffer(n * 4);
    const src = new Uint16Array(buf, n * 2, n);
    for (let i = 0; i < n; i++) src[i] = 0x3f80 + (i % 100);
    const expected = bf16ToF32(src.slice());
    const out = bf16ToF32(src, new Float32Array(buf, 0, n));
    assert.deepEqual(bitsOf(out), bitsOf(expected));
  });

  void it('narrows in place into the memory of the values, from the same start', () => {
    const n = 1003;
    for (const dtype of ['BF16', 'F16'] as const) {
      const values = new Float32Array(n);
      for (let i = 0; i < n; i++) values[i] = (i - 500) / 7 + i * 1e-3;
      const expected = encodeFromF32(values, dtype).slice();
      const got = encodeFromF32(values, dtype, new Uint8Array(values.buffer));
      assert.equal(got.buffer, values.buffer, dtype);
      assert.deepEqual([...got], [...expected], dtype);
    }
  });
});
