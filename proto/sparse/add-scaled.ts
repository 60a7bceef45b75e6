/**
 * Adds scaled sparse entries into a dense fp32 accumulator: the one operation
 * both `dppa apply` and the server's merge perform.
 */
import type { DecodedChunk } from './chunk-codec.js';

/**
 * `acc[positions[i]] += scale · values[i]`, each sum rounded once to fp32 (the
 * product and sum are formed in float64 and stored into the Float32Array), so
 * that the result is the same wherever it is computed.
 */
export function addScaled(acc: Float32Array, positions: Float64Array, values: Float32Array, scale: number): void {
  for (let i = 0; i < positions.length; i++) {
    const p = positions[i]!;
    acc[p] = acc[p]! + scale * values[i]!;
  }
}

/**
 * `acc[p] += scale · v` for every entry of a decoded chunk, as {@link addScaled};
 * a RANGE chunk's entries are added as one run, without its positions.
 */
export function addChunkScaled(acc: Float32Array, chunk: DecodedChunk, scale: number): void {
  if (!chunk.range) {
    addScaled(acc, chunk.positions, chunk.values, scale);
    return;
  }
  const { values } = chunk;
  const first = chunk.firstPosition;
  if (first + values.length > acc.length)
    throw new RangeError(`entries up to position ${first + values.length - 1} do not fit ${acc.length} elements`);
  for (let i = 0, p = first; i < values.length; i++, p++) acc[p] = acc[p]! + scale * values[i]!;
}
