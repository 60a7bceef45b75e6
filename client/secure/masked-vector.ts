/**
 * The party's masked vector on the union U, produced chunk by chunk: its scaled values laid out on U tensor by
 * tensor (0 where it kept nothing), coded in fixed point and masked at their offset, each chunk with its CRC-32C.
 * Masking is deterministic, so a resumed upload starts at the offset the server holds and sends the same words.
 */
import { crc32c } from '../../proto/sparse/index.js';
import { ProtocolStateError, type FixedPoint, type SecureParty } from '../../proto/secure/index.js';
import type { ScaledTensor } from './scaled-delta.js';

/** The union's positions in one tensor, ascending; U is the concatenation of these in order. */
export interface UnionTensor {
  name: string;
  positions: ArrayLike<number>;
}

/** U as {@link maskedChunks} reads it: its tensors' names and sizes, their positions one tensor at a time. */
export interface PartyUnion {
  tensors: readonly { name: string; count: number }[];
  /** Positions of tensor k, ascending. */
  positions(k: number): Promise<ArrayLike<number>>;
}

/** A union held in memory as a {@link PartyUnion}. */
export function unionInMemory(union: Iterable<UnionTensor>): PartyUnion {
  const all = [...union];
  return {
    tensors: all.map((u) => ({ name: u.name, count: u.positions.length })),
    positions: (k) => Promise.resolve(all[k]!.positions),
  };
}

/** One chunk of the masked vector. */
export interface MaskedWords {
  /** Index of the first word in the whole vector. */
  offset: number;
  words: Uint32Array;
  /** CRC-32C of the words' little-endian bytes. */
  crc32c: number;
}

/** Default words per chunk (1 MiB). */
export const DEFAULT_CHUNK_WORDS = 262144;

/** Options of {@link maskedChunks}. */
export interface MaskedChunkOptions {
  /** Start at this word (the server holds the words before it). @default 0 */
  from?: number;
  /** Words per chunk. @default {@link DEFAULT_CHUNK_WORDS} */
  chunkWords?: number;
  /**
   * Told of the values clipped to the bound: in each chunk coded, and once for the words before `from` (counted, not
   * coded), so the counts told add up to those of the whole vector.
   */
  onClipped?: (count: number) => void;
  signal?: AbortSignal;
}

/** CRC-32C of words as little-endian bytes. */
export function wordsCrc(words: Uint32Array): number {
  return crc32c(Buffer.from(words.buffer, words.byteOffset, words.byteLength));
}

/**
 * The party's values on one union tensor, range by range (so that neither a whole tensor's values nor a long
 * synchronous pass are needed): `range(start, end)` gives `t.values[j]` at the index of `t.positions[j]` in the
 * union's positions, for the indices in [start, end); ranges are asked in increasing order, and the kept values
 * before the first range go to `before`.
 */
class Spread {
  private j = 0;
  private u = 0;

  constructor(
    private readonly name: string,
    private readonly union: ArrayLike<number>,
    private readonly t: ScaledTensor | undefined,
  ) {}

  /** @throws ProtocolStateError when a kept position is missing from the union (the server's U is wrong). */
  range(start: number, end: number, before: (value: number) => void): Float64Array {
    const out = new Float64Array(end - start);
    const t = this.t;
    if (t === undefined) return out;
    const union = this.union;
    while (this.j < t.positions.length) {
      const p = t.positions[this.j]!;
      while (this.u < end && union[this.u]! < p) this.u++;
      if (this.u === end && end < union.length) break;
      if (this.u === end || union[this.u] !== p)
        throw new ProtocolStateError(`tensor ${this.name}: kept position ${p} is not in the union the server sent`);
      if (this.u >= start) out[this.u - start] = t.values[this.j]!;
      else before(t.values[this.j]!);
      this.j++;
    }
    return out;
  }
}

/**
 * The masked vector from word `from` on, in chunks. `scaled` gives the party's tensors in the base checkpoint's
 * order, which is U's order: each is read when U reaches it and dropped once coded, so at most one tensor of the
 * delta is held (and one read past, not yet reached); union tensors the party did not send are 0. U's positions are
 * read one tensor at a time too (none for the tensors before `from`).
 * @throws ProtocolStateError when the party sent a tensor the union lacks, a position outside it, or its tensors
 *   come in another order than U's (a union not in the base's tensor order).
 */
export async function* maskedChunks(
  party: SecureParty,
  fp: FixedPoint,
  union: PartyUnion,
  scaled: AsyncIterable<ScaledTensor>,
  o: MaskedChunkOptions = {},
): AsyncGenerator<MaskedWords, void, undefined> {
  const from = o.from ?? 0;
  const chunkWords = o.chunkWords ?? DEFAULT_CHUNK_WORDS;
  const tensors = union.tensors;
  const rank = new Map(tensors.map((u, k) => [u.name, k]));
  const it = scaled[Symbol.asyncIterator]();
  // The party's next tensor with kept positions that U has not reached yet: read when U passes the previous one.
  const pull = async (after: number): Promise<ScaledTensor | undefined> => {
    for (;;) {
      const next = await it.next();
      if (next.done === true) return undefined;
      const t = next.value;
      if (t.positions.length === 0) continue;
      const k = rank.get(t.name);
      if (k === undefined)
        throw new ProtocolStateError(`tensor ${t.name} of this party's delta is not in the union the server sent`);
      if (k <= after)
        throw new ProtocolStateError(
          `tensor ${t.name} of this party's delta comes after ${tensors[after]!.name} in the delta but before it in the union the server sent: U is not in the base checkpoint's tensor order (a server older than this client?)`,
        );
      return t;
    }
  };
  try {
    // Every tensor after the last one taken is read by pull(k): any left with kept positions was refused there.
    let next = await pull(-1);
    let offset = 0;
    let skipped = 0;
    for (const [k, u] of tensors.entries()) {
      o.signal?.throwIfAborted();
      const mine = next?.name === u.name ? next : undefined;
      if (mine !== undefined) next = await pull(k);
      const n = u.count;
      if (offset + n <= from) {
        if (mine !== undefined) skipped += countClipped(mine.values, fp);
      } else {
        const positions = await union.positions(k);
        if (positions.length !== n)
          throw new ProtocolStateError(`union tensor ${u.name}: ${positions.length} positions read, ${n} expected`);
        const spread = new Spread(u.name, positions, mine);
        let told = false;
        for (let start = Math.max(0, from - offset); start < n; start += chunkWords) {
          const end = Math.min(n, start + chunkWords);
          const values = spread.range(start, end, (v) => {
            if (Math.abs(v) > fp.bound) skipped++;
          });
          if (!told) {
            if (skipped > 0) o.onClipped?.(skipped);
            skipped = 0;
            told = true;
          }
          const { words, clipped } = party.maskInput(values, fp, offset + start);
          if (clipped > 0) o.onClipped?.(clipped);
          yield { offset: offset + start, words, crc32c: wordsCrc(words) };
        }
      }
      offset += n;
    }
    if (skipped > 0) o.onClipped?.(skipped);
  } finally {
    // A stopped vector (a dropped upload, an error) closes the delta it reads.
    await it.return?.();
  }
}

/** Values beyond the bound, which coding clips (proto/secure encodeFixed). */
function countClipped(values: ArrayLike<number>, fp: FixedPoint): number {
  let n = 0;
  for (let i = 0; i < values.length; i++) if (Math.abs(values[i]!) > fp.bound) n++;
  return n;
}

/** Number of words of the vector on `union`. */
export function unionLength(union: Iterable<UnionTensor>): number {
  let n = 0;
  for (const u of union) n += u.positions.length;
  return n;
}
