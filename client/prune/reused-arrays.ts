/**
 * Typed arrays kept from one tensor to the next, since fresh memory's page faults cost more than the work done on
 * it. See docs/design/pruning.md.
 */

/** Named buffers that grow to the largest size asked for and are then reused. */
export class ReusedArrays {
  private readonly f64 = new Map<string, Float64Array>();
  private readonly f32 = new Map<string, Float32Array>();

  /** The first `n` elements of buffer `slot`: contents undefined, valid until `slot` is asked for again. */
  float64(slot: string, n: number): Float64Array {
    let a = this.f64.get(slot);
    if (a === undefined || a.length < n) this.f64.set(slot, (a = new Float64Array(n)));
    return a.subarray(0, n);
  }

  /** As {@link ReusedArrays.float64}. */
  float32(slot: string, n: number): Float32Array {
    let a = this.f32.get(slot);
    if (a === undefined || a.length < n) this.f32.set(slot, (a = new Float32Array(n)));
    return a.subarray(0, n);
  }
}
