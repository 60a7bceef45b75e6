/**
 * Supports: a party's kept positions (sorted, distinct uint32 indices into a
 * flat index space) and their union U, on which every party's masked vector
 * is laid out (0 where the party kept nothing).
 */
import { ProtocolStateError } from './errors.js';

/** Throws unless `positions` increase strictly (`base`: the index of its first entry, in the message). */
function checkSorted(positions: Uint32Array, what: string, base = 0): void {
  for (let i = 1; i < positions.length; i++) {
    if (positions[i]! <= positions[i - 1]!)
      throw new ProtocolStateError(`${what}: positions not strictly increasing at ${base + i}`);
  }
}

/** Entries merged (or checked) between two yields of {@link unionSupportYielding}. */
export const UNION_SLICE = 1 << 20;

/** The union of increasing `a` and `b`, merged `budget` entries per call of `step` (the one merge kernel). */
class UnionMerge {
  private i = 0;
  private j = 0;
  private n = 0;
  private readonly out: Uint32Array;
  constructor(
    private readonly a: Uint32Array,
    private readonly b: Uint32Array,
  ) {
    this.out = new Uint32Array(a.length + b.length);
  }

  /** Merges up to `budget` more entries; true once both inputs are consumed. */
  step(budget: number): boolean {
    const { a, b, out } = this;
    let { i, j, n } = this;
    const stop = Math.min(n + budget, out.length);
    while (n < stop && (i < a.length || j < b.length)) {
      const x = i < a.length ? a[i]! : Infinity;
      const y = j < b.length ? b[j]! : Infinity;
      if (x <= y) {
        out[n++] = x;
        i++;
        if (x === y) j++;
      } else {
        out[n++] = y;
        j++;
      }
    }
    this.i = i;
    this.j = j;
    this.n = n;
    return i === a.length && j === b.length;
  }

  /** The union (a copy of its length: the larger buffer is freed). */
  result(): Uint32Array {
    return this.out.slice(0, this.n);
  }
}

/** The sorted union of sorted supports. */
export function unionSupport(supports: readonly Uint32Array[]): Uint32Array {
  supports.forEach((s, i) => checkSorted(s, `support ${i}`));
  let union: Uint32Array = new Uint32Array(0);
  for (const s of supports) {
    const m = new UnionMerge(union, s);
    m.step(Infinity);
    union = m.result();
  }
  return union;
}

/**
 * {@link unionSupport} in slices of {@link UNION_SLICE} entries with `pause()` awaited between them (a server passes
 * `setImmediate` so that it keeps answering calls and keepalive pings over tensors of millions of positions).
 */
export async function unionSupportYielding(
  supports: readonly Uint32Array[],
  pause: () => Promise<unknown>,
): Promise<Uint32Array> {
  for (const [k, s] of supports.entries())
    for (let i = 0; i < s.length; i += UNION_SLICE) {
      // Overlapping by one entry, so that every neighbouring pair is checked.
      const from = Math.max(0, i - 1);
      checkSorted(s.subarray(from, i + UNION_SLICE), `support ${k}`, from);
      await pause();
    }
  let union: Uint32Array = new Uint32Array(0);
  for (const s of supports) {
    const m = new UnionMerge(union, s);
    while (!m.step(UNION_SLICE)) await pause();
    union = m.result();
  }
  return union;
}

/**
 * A party's values laid out on the union: `values[j]` at the index of
 * `positions[j]` in `union`, 0 elsewhere.
 * @throws ProtocolStateError if a position is not in the union
 */
export function spreadOnUnion(union: Uint32Array, positions: Uint32Array, values: ArrayLike<number>): Float32Array {
  if (positions.length !== values.length)
    throw new ProtocolStateError(`${positions.length} positions, ${values.length} values`);
  checkSorted(positions, 'support');
  const out = new Float32Array(union.length);
  let u = 0;
  for (let j = 0; j < positions.length; j++) {
    const p = positions[j]!;
    while (u < union.length && union[u]! < p) u++;
    if (u === union.length || union[u] !== p) throw new ProtocolStateError(`position ${p} is not in the union`);
    out[u] = values[j]!;
  }
  return out;
}
