/**
 * Where tensor merges run: on worker threads (the merge is CPU-bound:
 * position decoding, the scaled adds and the bf16 conversions), or inline in
 * this thread. Either way each tensor in flight has one fp32 buffer, reused
 * for the next tensor unless it is an embedding's, and the result is the same.
 */
import { Worker } from 'node:worker_threads';
import { FormatError } from '../../proto/errors.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import { mergeTensorOutputs, SpooledTensorError, type TensorTask } from './tensor-merge.js';

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
 * Largest accumulator or output block a thread keeps for the next tensor: the
 * few larger tensors (embeddings) get fresh memory, dropped once used, so
 * that threads which each merged one do not each hold it to the end.
 */
const MAX_KEPT_BYTES = 64 * 1024 * 1024;

/** A thread's fp32 accumulators, reused from tensor to tensor up to {@link MAX_KEPT_BYTES}. */
export class AccumulatorPool {
  private readonly free: Float32Array[] = [];

  /** Runs `use` on an accumulator of at least `numel` elements, then takes it back. */
  async with<T>(numel: number, use: (acc: Float32Array) => Promise<T>): Promise<T> {
    const kept = this.free.pop();
    const acc = kept !== undefined && kept.length >= numel ? kept : new Float32Array(numel);
    try {
      return await use(acc);
    } finally {
      const keep = acc.byteLength <= MAX_KEPT_BYTES ? acc : kept;
      if (keep !== undefined) this.free.push(keep);
    }
  }
}

/**
 * Output memory handed back after use: filling fresh memory for every merged
 * tensor cost its page faults and the garbage collector's time. One block of
 * at most {@link MAX_KEPT_BYTES} is kept: while a thread fills one, the block
 * it filled before is being written and comes back after.
 */
export class OutputPool {
  private kept: ArrayBuffer | undefined;

  /** The block kept, if any; it is no longer kept. */
  private take(): Uint8Array | undefined {
    const b = this.kept;
    this.kept = undefined;
    return b === undefined ? undefined : new Uint8Array(b);
  }

  /** Keeps the larger of `block` and the block kept, unless it is over {@link MAX_KEPT_BYTES}. */
  give(block: ArrayBuffer): void {
    if (block.byteLength > MAX_KEPT_BYTES) return;
    if (this.kept === undefined || block.byteLength >= this.kept.byteLength) this.kept = block;
  }

  /**
   * Runs `fill` on the block kept (if any); the block comes back here at once
   * unless the result is in it (give the result's memory back once written).
   */
  async fillWith(fill: (out: Uint8Array | undefined) => Promise<Uint8Array>): Promise<Uint8Array> {
    const out = this.take();
    let bytes: Uint8Array | undefined;
    try {
      bytes = await fill(out);
      return bytes;
    } finally {
      if (out !== undefined && bytes?.buffer !== out.buffer) this.give(out.buffer as ArrayBuffer);
    }
  }
}

/** Merges in this thread on an open base (the caller keeps one more tensor in flight, so that its I/O overlaps these additions). */
export function inlineRunner(base: Checkpoint): MergeRunner {
  const accumulators = new AccumulatorPool();
  const outputs = new OutputPool();
  return {
    run: async (task, numel, signal) => {
      const bytes = await accumulators.with(numel, (acc) =>
        outputs.fillWith(async (out) => (await mergeTensorOutputs(base, task, acc, signal, out)).bytes),
      );
      return {
        bytes,
        release: () => outputs.give(bytes.buffer as ArrayBuffer),
      };
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

/** A message to a merge worker: a tensor to merge, or output memory to reuse. */
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
