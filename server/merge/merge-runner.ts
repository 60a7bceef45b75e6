/**
 * Where tensor merges run: on worker threads (the merge is CPU-bound:
 * position decoding, the scaled adds and the bf16 conversions), or inline in
 * this thread. Either way each tensor in flight has one fp32 buffer, reused
 * for the next tensor unless it is an embedding's, and the result is the same.
 */
import { Worker } from 'node:worker_threads';
import { FormatError } from '../../proto/errors.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import {
  ACCUMULATOR_KEPT_MAX_BYTES,
  accumulatorElements,
  mergeTensorOutputs,
  SpooledTensorError,
  type TensorTask,
} from './tensor-merge.js';

/** A merged tensor a runner lends out: call `release()` once it is written, so that its memory takes the next result. */
export interface MergedTensor {
  /** The tensor in the base's dtype (empty if the task asked for no dense tensor). */
  bytes: Uint8Array;
  release(): void;
}

/** Runs tensor merges; `run` returns the merged tensor in the base's dtype. */
export interface MergeRunner {
  run(task: TensorTask, numel: number, signal?: AbortSignal): Promise<MergedTensor>;
  close(): Promise<void>;
}

/**
 * Largest accumulator a thread keeps for the next tensor: the few larger
 * tensors (embeddings) get fresh memory, dropped once used, so that threads
 * which each merged one do not each hold it to the end.
 */
const MAX_KEPT_BYTES = ACCUMULATOR_KEPT_MAX_BYTES;

/** Accumulators a thread keeps: one being filled while the result in the other is written. */
const MAX_KEPT = 2;

/**
 * A thread's fp32 accumulators, reused from tensor to tensor up to {@link MAX_KEPT_BYTES}. A merged tensor is
 * encoded into its accumulator's memory, which is lent out with the result and given back once it is written
 * (filling fresh memory for every tensor cost its page faults and the garbage collector's time).
 */
export class AccumulatorPool {
  private readonly free: ArrayBuffer[] = [];

  /** An accumulator of at least `numel` elements: the smallest kept one large enough, if any. */
  take(numel: number): Float32Array {
    // Kept largest first: the last one large enough is the smallest.
    let i = this.free.length - 1;
    while (i >= 0 && this.free[i]!.byteLength < numel * 4) i--;
    if (i < 0) return new Float32Array(numel);
    return new Float32Array(this.free.splice(i, 1)[0]!);
  }

  /** Takes an accumulator's memory back, keeping the largest {@link MAX_KEPT} of at most {@link MAX_KEPT_BYTES}. */
  give(memory: ArrayBuffer): void {
    if (memory.byteLength > MAX_KEPT_BYTES) return;
    this.free.push(memory);
    this.free.sort((x, y) => y.byteLength - x.byteLength);
    this.free.length = Math.min(this.free.length, MAX_KEPT);
  }
}

/** Merges in this thread on an open base (the caller keeps one more tensor in flight, so that its I/O overlaps these additions). */
export function inlineRunner(base: Checkpoint): MergeRunner {
  const accumulators = new AccumulatorPool();
  return {
    run: async (task, numel, signal) => {
      const acc = accumulators.take(Math.max(numel, accumulatorElements(base.info(task.name), task)));
      let bytes: Uint8Array;
      try {
        bytes = (await mergeTensorOutputs(base, task, acc, signal)).bytes;
      } catch (err) {
        accumulators.give(acc.buffer as ArrayBuffer);
        throw err;
      }
      return { bytes, release: () => accumulators.give(acc.buffer as ArrayBuffer) };
    },
    close: () => Promise.resolve(),
  };
}

/** A message from a merge worker: on success the result is the first `byteLength` bytes of `buffer`, whose ownership moves here. */
export type WorkerReply = { ok: true; buffer: ArrayBuffer; byteLength: number } | ({ ok: false } & WorkerFailure);

/** A worker's error as posted: its name and message, a file system error's code, and what a {@link SpooledTensorError} carries. */
export interface WorkerFailure {
  name: string;
  message: string;
  code?: string;
  spooled?: { party: string; reason: string; file: string; tensor: string };
}

/** A worker's error as it is posted. */
export function workerFailure(err: unknown): WorkerFailure {
  const e = err instanceof Error ? err : new Error(String(err));
  if (e instanceof SpooledTensorError)
    return {
      name: e.name,
      message: e.message,
      spooled: { party: e.party, reason: e.reason, file: e.spoolFile, tensor: e.tensorName },
    };
  const code = (e as NodeJS.ErrnoException).code;
  return { name: e.name, message: e.message, ...(typeof code === 'string' ? { code } : {}) };
}

/** A message to a merge worker: a tensor to merge, or an accumulator's memory to reuse. */
export type WorkerRequest = { task: TensorTask; numel: number } | { reuse: ArrayBuffer };

/** Merges on `workers` threads, each with its own handle on the base and its own buffer. */
export function workerRunner(basePath: string, workers: number): MergeRunner {
  const fromSource = import.meta.url.endsWith('.ts');
  const url = new URL(`./merge-worker${fromSource ? '.ts' : '.js'}`, import.meta.url);
  const idle: Worker[] = [];
  const busy = new Map<Worker, { resolve: (m: MergedTensor) => void; reject: (e: Error) => void }>();
  const queue: { task: TensorTask; numel: number; resolve: (m: MergedTensor) => void; reject: (e: Error) => void }[] =
    [];
  const all: Worker[] = [];
  let failed: Error | undefined;
  let closed = false;
  const dispatch = (): void => {
    while (idle.length > 0 && queue.length > 0) {
      const w = idle.pop()!;
      const { task, numel, resolve, reject } = queue.shift()!;
      busy.set(w, { resolve, reject });
      w.postMessage({ task, numel } satisfies WorkerRequest);
    }
  };
  // The result's memory goes back to the worker that filled it, for its next tensor.
  const lent = (w: Worker, buffer: ArrayBuffer, byteLength: number): MergedTensor => ({
    bytes: new Uint8Array(buffer, 0, byteLength),
    release: () => {
      if (!closed) w.postMessage({ reuse: buffer } satisfies WorkerRequest, [buffer]);
    },
  });
  for (let i = 0; i < workers; i++) {
    const w = fromSource ? sourceWorker(url, basePath) : new Worker(url, { workerData: basePath });
    all.push(w);
    idle.push(w);
    w.on('message', (reply: WorkerReply) => {
      const p = busy.get(w)!;
      busy.delete(w);
      idle.push(w);
      if (reply.ok) p.resolve(lent(w, reply.buffer, reply.byteLength));
      else p.reject(revive(reply));
      dispatch();
    });
    const broken = (err: Error): void => {
      failed ??= err;
      busy.get(w)?.reject(err);
      busy.delete(w);
      for (const q of queue.splice(0)) q.reject(err);
    };
    w.on('error', broken);
    // A worker that dies without an error event (out of memory, terminate) must not leave its task pending forever.
    w.on('exit', (code) => broken(new Error(`merge worker exited (code ${code})`)));
  }
  return {
    run: (task, numel, signal) =>
      new Promise((resolve, reject) => {
        if (failed !== undefined) return reject(failed);
        if (signal?.aborted === true) return reject(signal.reason as Error);
        queue.push({ task, numel, resolve, reject });
        dispatch();
      }),
    // Terminating also stops a task in progress: an abort does not wait for the tensor at hand.
    close: async () => {
      closed = true;
      await Promise.all(all.map((w) => w.terminate()));
      const stopped = new Error('merge workers stopped');
      for (const p of busy.values()) p.reject(stopped);
      for (const q of queue.splice(0)) q.reject(stopped);
    },
  };
}

/**
 * Rebuilds a worker's error here, keeping format errors typed (their messages
 * name the spool file and tensor) and a file system error's code (a full or
 * failing disk pauses the job instead of failing it).
 */
function revive(reply: WorkerFailure): Error {
  const s = reply.spooled;
  if (s !== undefined) return new SpooledTensorError(s.party, s.reason, s.file, s.tensor);
  const err = /FormatError$|^ChecksumError$|^TruncatedError$|^UnsupportedDtypeError$/.test(reply.name)
    ? new FormatError(reply.message)
    : new Error(reply.message);
  err.name = reply.name;
  if (reply.code !== undefined) Object.assign(err, { code: reply.code });
  return err;
}

/**
 * Running from TypeScript sources (tests, tsx): Node 20 does not pass tsx's
 * loader on to worker threads, so the worker registers it before importing.
 */
function sourceWorker(url: URL, basePath: string): Worker {
  const boot = `import('tsx/esm/api').then((tsx) => { tsx.register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(boot, { eval: true, workerData: basePath });
}
