/** SHA-256 of a range whose pieces arrive in any order (the base's parallel reads): hashed in order, early pieces held as copies until their turn (fewer than ORDERED_LOOKAHEAD MiB-chunks: read-into.ts). */
import { createHash } from 'node:crypto';

/** Hashes the pieces of a `byteLength`-byte range handed to {@link OrderedHash.add} in any order. */
export class OrderedHash {
  private readonly hash = createHash('sha256');
  private readonly early = new Map<number, Uint8Array>();
  private next = 0;

  constructor(private readonly byteLength: number) {}

  /** Takes the piece starting `offset` bytes into the range (copied if it comes early: the caller may reuse it). */
  add(chunk: Uint8Array, offset: number): void {
    if (offset !== this.next) {
      this.early.set(offset, chunk.slice());
      return;
    }
    this.hash.update(chunk);
    this.next += chunk.byteLength;
    for (let p = this.early.get(this.next); p !== undefined; p = this.early.get(this.next)) {
      this.early.delete(this.next);
      this.hash.update(p);
      this.next += p.byteLength;
    }
  }

  /**
   * The SHA-256 of the whole range.
   * @throws Error if some piece of the range was never added.
   */
  digest(): Uint8Array {
    if (this.next !== this.byteLength || this.early.size > 0)
      throw new Error(`hashed ${this.next} of ${this.byteLength} bytes: a piece of the range is missing`);
    return new Uint8Array(this.hash.digest());
  }
}
