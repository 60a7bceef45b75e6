/**
 * Supports: a party's kept positions (sorted, distinct uint32 indices into a
 * flat index space) and their union U, on which every party's masked vector
 * is laid out (0 where the party kept nothing).
 */
import { ProtocolStateError } from './errors.js';

function checkSorted(positions: Uint32Array, what: string): void {
  for (let i = 1; i < positions.length; i++) {
    if (positions[i]! <= positions[i - 1]!)
      throw new ProtocolStateError(`${what}: positions not strictly increasing at ${i}`);
  }
}

/** The sorted union of sorted supports. */
export function unionSupport(supports: readonly Uint32Array[]): Uint32Array {
  supports.forEach((s, i) => checkSorted(s, `support ${i}`));
  let union: Uint32Array = new Uint32Array(0);
  for (const s of supports) {
    const out = new Uint32Array(union.length + s.length);
    let a = 0;
    let b = 0;
    let n = 0;
    while (a < union.length || b < s.length) {
      const x = a < union.length ? union[a]! : Infinity;
      const y = b < s.length ? s[b]! : Infinity;
      if (x <= y) {
        out[n++] = x;
        a++;
        if (x === y) b++;
      } else {
        out[n++] = y;
        b++;
      }
    }
    union = out.slice(0, n);
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
