/**
 * Positional reads of a byte range through page-aligned bounce buffers (a WebAssembly memory), which make the
 * kernel's copy several times faster than into a misaligned Buffer. See docs/design/safetensors.md.
 */

import type { FileHandle } from 'node:fs/promises';
import { TruncatedError } from '../errors.js';

/** Bytes per read call and per bounce slot: fits in L2 so the copy-out is cache-hot. */
const CHUNK_BYTES = 1024 * 1024;

/** Reads in flight per range, spread over libuv's (default 4) threads. */
const PARALLEL_READS = 4;

/** Bounce slots shared by all reads in the process. */
const SLOTS = 16;

/** Ranges smaller than this are read directly: the bounce would only add a copy. */
const DIRECT_BELOW = 64 * 1024;

/**
 * Chunks a read whose sink wants them in order ({@link readChunks} `lookahead`) may have claimed from the first not yet
 * handed over: such a sink holds at most this many less one chunks (of 1 MiB) early.
 */
export const ORDERED_LOOKAHEAD = 4;

class SlotPool {
  private readonly free: Uint8Array[] = [];
  private readonly waiters: ((slot: Uint8Array) => void)[] = [];

  constructor(buffer: ArrayBuffer) {
    for (let i = 0; i < SLOTS; i++) this.free.push(new Uint8Array(buffer, i * CHUNK_BYTES, CHUNK_BYTES));
  }

  acquire(): Promise<Uint8Array> | Uint8Array {
    const slot = this.free.pop();
    if (slot !== undefined) return slot;
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(slot: Uint8Array): void {
    const waiter = this.waiters.shift();
    if (waiter !== undefined) waiter(slot);
    else this.free.push(slot);
  }
}

/** The part of the WebAssembly global used here (the project's lib settings do not declare it). */
interface WasmGlobal {
  Memory: new (descriptor: { initial: number; maximum: number }) => { buffer: ArrayBuffer };
}

let pool: SlotPool | null | undefined;

function slotPool(): SlotPool | null {
  if (pool === undefined) {
    const wasm = (globalThis as { WebAssembly?: WasmGlobal }).WebAssembly;
    try {
      const pages = (SLOTS * CHUNK_BYTES) / 65536;
      pool = wasm === undefined ? null : new SlotPool(new wasm.Memory({ initial: pages, maximum: pages }).buffer);
    } catch {
      // Address-space limits (ulimit -v) can refuse the reservation; direct reads still work.
      pool = null;
    }
  }
  return pool;
}

/**
 * Receives consecutive pieces of a range: `chunk` holds the bytes starting
 * `offset` bytes into the range and is only valid during the call.
 */
export type ChunkSink = (chunk: Uint8Array, offset: number) => void;

async function readFully(
  fh: FileHandle,
  dst: Uint8Array,
  position: number,
  where: { file: string; tensor: string },
): Promise<void> {
  for (let done = 0; done < dst.byteLength;) {
    const { bytesRead } = await fh.read(dst, done, dst.byteLength - done, position + done);
    if (bytesRead === 0)
      throw new TruncatedError(`file ended at byte ${position + done} inside the tensor's data`, where);
    done += bytesRead;
  }
}

/**
 * Reads `byteLength` bytes of `fh` from `position`, handing them to `sink`
 * chunk by chunk (in any order, each chunk once). Chunk boundaries are
 * multiples of 4 bytes into the range, so a sink may convert whole elements.
 * @param where File and tensor named in errors.
 * @param lookahead - Chunk k is not claimed until chunk k − lookahead has been
 *   handed to `sink` (a sink that holds early chunks holds fewer than this);
 *   a reader waiting for that holds no bounce slot.
 * @throws TruncatedError if the file ends before the range does.
 * @throws The signal's reason if `signal` aborts (checked between chunks).
 */
export async function readChunks(
  fh: FileHandle,
  position: number,
  byteLength: number,
  where: { file: string; tensor: string },
  signal: AbortSignal | undefined,
  sink: ChunkSink,
  lookahead = Infinity,
): Promise<void> {
  signal?.throwIfAborted();
  const slots = slotPool();
  if (slots === null || byteLength < DIRECT_BELOW) {
    const buf = new Uint8Array(byteLength);
    await readFully(fh, buf, position, where);
    sink(buf, 0);
    return;
  }
  const chunks = Math.ceil(byteLength / CHUNK_BYTES);
  let next = 0;
  let failed = false;
  // Chunks handed to the sink, and how many of the first are (the lookahead counts from there).
  const handed = new Uint8Array(chunks);
  let prefix = 0;
  let wakers: (() => void)[] = [];
  const wake = (): void => {
    const w = wakers;
    wakers = [];
    for (const f of w) f();
  };
  const worker = async (): Promise<void> => {
    for (;;) {
      // Waits without a slot: the chunk it waits for may need one.
      while (!failed && next < chunks && next >= prefix + lookahead)
        await new Promise<void>((resolve) => wakers.push(resolve));
      if (failed || next >= chunks) return;
      const k = next++;
      const offset = k * CHUNK_BYTES;
      const length = Math.min(CHUNK_BYTES, byteLength - offset);
      const slot = await slots.acquire();
      try {
        signal?.throwIfAborted();
        const dst = slot.subarray(0, length);
        await readFully(fh, dst, position + offset, where);
        sink(dst, offset);
        handed[k] = 1;
        while (prefix < chunks && handed[prefix] === 1) prefix++;
      } catch (err) {
        failed = true;
        throw err;
      } finally {
        slots.release(slot);
        wake();
      }
    }
  };
  // allSettled, not all: the caller must not see the promise settle while
  // other workers can still write into its buffer.
  const results = await Promise.allSettled(Array.from({ length: Math.min(PARALLEL_READS, chunks) }, worker));
  const rejected = results.find((r) => r.status === 'rejected');
  if (rejected !== undefined) throw rejected.reason;
  signal?.throwIfAborted();
}

/**
 * Fills `out` with the bytes of `fh` starting at `position`.
 * @throws As {@link readChunks}.
 */
export async function readInto(
  fh: FileHandle,
  out: Uint8Array,
  position: number,
  where: { file: string; tensor: string },
  signal: AbortSignal | undefined,
): Promise<void> {
  if (out.byteLength < DIRECT_BELOW) {
    signal?.throwIfAborted();
    await readFully(fh, out, position, where);
    return;
  }
  await readChunks(fh, position, out.byteLength, where, signal, (chunk, offset) => out.set(chunk, offset));
}
