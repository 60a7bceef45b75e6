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

/** Union positions written out between two yields of {@link unionStreams} (4 MiB of uint32). */
export const UNION_SLICE = 1 << 20;

/**
 * A run of increasing positions: `positions[0..count)`, or when `positions` is undefined the `count` positions from
 * `first` on (a RANGE chunk's, never written out).
 */
export interface PositionPiece {
  first: number;
  count: number;
  positions: ArrayLike<number> | undefined;
}

/**
 * The union of k increasing position streams, each fed a piece at a time (the one merge kernel): it holds one piece
 * per stream, whatever the streams' lengths, and checks that each stream increases strictly and stays below 2^32.
 */
class UnionMerge {
  /** Each stream's current piece; undefined once used up (or ended). */
  private readonly pieces: (PositionPiece | undefined)[];
  /** Index in its piece of each stream's next position. */
  private readonly at: Float64Array;
  /** Each stream's next position (Infinity without a piece). */
  private readonly heads: Float64Array;
  /** The last position taken from each stream, −1 before its first. */
  private readonly last: Float64Array;
  /** Positions taken from each stream so far (for messages). */
  private readonly taken: Float64Array;
  private readonly ended: boolean[];

  constructor(streams: number) {
    this.pieces = new Array<PositionPiece | undefined>(streams).fill(undefined);
    this.at = new Float64Array(streams);
    this.heads = new Float64Array(streams).fill(Infinity);
    this.last = new Float64Array(streams).fill(-1);
    this.taken = new Float64Array(streams);
    this.ended = new Array<boolean>(streams).fill(false);
  }

  /** A stream whose piece is used up and that has not ended (feed it next), or −1 when there is none. */
  wanting(): number {
    for (let k = 0; k < this.pieces.length; k++) if (this.pieces[k] === undefined && !this.ended[k]) return k;
    return -1;
  }

  /** True once every stream ended. */
  get done(): boolean {
    return this.ended.every((e) => e);
  }

  /**
   * Gives stream `k` its next piece (held until used up; an empty one is skipped), or ends it (undefined).
   * @throws ProtocolStateError for a position at or beyond 2^32, or one not above the stream's last
   */
  feed(k: number, piece: PositionPiece | undefined): void {
    if (piece === undefined) {
      this.ended[k] = true;
      return;
    }
    if (piece.count === 0) return;
    const last = piece.positions === undefined ? piece.first + piece.count - 1 : piece.positions[piece.count - 1]!;
    if (last > 0xffffffff) throw new ProtocolStateError(`support ${k}: position ${last} is beyond 2^32 − 1`);
    this.pieces[k] = piece;
    this.at[k] = 0;
    this.advance(k);
  }

  /** Moves stream `k` to the next position of its piece, which must be above the last one taken. */
  private advance(k: number): void {
    const p = this.pieces[k]!;
    const i = this.at[k]!;
    if (i === p.count) {
      this.pieces[k] = undefined;
      this.heads[k] = Infinity;
      return;
    }
    const x = p.positions === undefined ? p.first + i : p.positions[i]!;
    if (x <= this.last[k]!)
      throw new ProtocolStateError(`support ${k}: positions not strictly increasing at ${this.taken[k]}`);
    this.heads[k] = x;
  }

  /**
   * Writes the next union positions into `out` from index `from` on, until `out` is full, a stream wants a piece
   * ({@link wanting}) or every stream ended.
   * @returns The index after the last position written.
   * @throws ProtocolStateError when a stream does not increase strictly
   */
  fill(out: Uint32Array, from: number): number {
    const { pieces, heads, at, last, taken } = this;
    const k = pieces.length;
    let n = from;
    while (n < out.length) {
      let min = Infinity;
      for (let s = 0; s < k; s++) {
        if (pieces[s] === undefined && !this.ended[s]) return n;
        if (heads[s]! < min) min = heads[s]!;
      }
      if (min === Infinity) return n;
      out[n++] = min;
      for (let s = 0; s < k; s++) {
        if (heads[s] !== min) continue;
        last[s] = min;
        at[s]!++;
        taken[s]!++;
        this.advance(s);
      }
    }
    return n;
  }
}

/** The sorted union of sorted supports. */
export function unionSupport(supports: readonly Uint32Array[]): Uint32Array {
  const merge = new UnionMerge(supports.length);
  supports.forEach((s, k) => merge.feed(k, { first: 0, count: s.length, positions: s }));
  const out = new Uint32Array(supports.reduce((n, s) => n + s.length, 0));
  let n = 0;
  while (!merge.done) {
    // Each support is one piece: used up, it has ended.
    for (let k = merge.wanting(); k >= 0; k = merge.wanting()) merge.feed(k, undefined);
    n = merge.fill(out, n);
  }
  return out.slice(0, n);
}

/**
 * The union of increasing position streams, in bounded memory: one piece per stream and a window of `window` words
 * (their sizes, not the streams', bound it). `write` gets each full window (a view of one reused buffer, valid until
 * its promise settles), then `pause()` is awaited (a server passes `setImmediate` so that it keeps answering calls and
 * keepalive pings over tensors of millions of positions). A stream's piece is held until used up, then the next
 * one is asked for.
 * @returns The number of positions written.
 * @throws ProtocolStateError when a stream does not increase strictly or reaches 2^32; what a stream (its `next()`,
 *   else its `return()`) throws
 */
export async function unionStreams(
  streams: readonly AsyncIterable<PositionPiece>[],
  write: (words: Uint32Array) => Promise<unknown>,
  pause: () => Promise<unknown>,
  window = UNION_SLICE,
): Promise<number> {
  const iterators = streams.map((s) => s[Symbol.asyncIterator]());
  const merge = new UnionMerge(streams.length);
  const out = new Uint32Array(window);
  let n = 0;
  let total = 0;
  try {
    for (;;) {
      for (let k = merge.wanting(); k >= 0; k = merge.wanting()) {
        const next = await iterators[k]!.next();
        merge.feed(k, next.done === true ? undefined : next.value);
      }
      n = merge.fill(out, n);
      if (n < out.length && !merge.done) continue;
      if (n > 0) await write(out.subarray(0, n));
      total += n;
      n = 0;
      if (merge.done) break;
      await pause();
    }
  } catch (err) {
    // The streams an error left unfinished are closed (their files); the error stays the one thrown.
    await closeAll(iterators);
    throw err;
  }
  const refused = await closeAll(iterators);
  if (refused !== undefined) throw refused.reason;
  return total;
}

/** Closes every iterator, whatever another's `return()` does. @returns The first that failed, if any. */
async function closeAll(iterators: readonly AsyncIterator<unknown>[]): Promise<PromiseRejectedResult | undefined> {
  const closed = await Promise.allSettled(iterators.map(async (it) => it.return?.()));
  return closed.find((c): c is PromiseRejectedResult => c.status === 'rejected');
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
