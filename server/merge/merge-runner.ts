/**
 * Where tensor merges run: on worker threads (the merge is CPU-bound:
 * position decoding, the scaled adds and the bf16 conversions), or inline in
 * this thread. Either way each tensor in flight has one reused fp32 buffer,
 * and the result is the same.
 */
import { Worker } from 'node:worker_threads';
import { FormatError } from '../../proto/errors.js';
import type { Checkpoint } from '../../proto/safetensors/index.js';
import { mergeTensor, type TensorTask } from './tensor-merge.js';

/** Runs tensor merges; `run` returns the merged tensor in the base's dtype. */
export interface MergeRunner {
  /** Tensors that can be in flight at once. */
  readonly width: number;
  run(task: TensorTask, numel: number, signal?: AbortSignal): Promise<Uint8Array>;
  close(): Promise<void>;
}

/** Merges in this thread on an open base (the caller keeps one more tensor in flight, so that its I/O overlaps these additions). */
export function inlineRunner(base: Checkpoint): MergeRunner {
  const free: Float32Array[] = [];
  return {
    width: 1,
    run: async (task, numel, signal) => {
      let buffer = free.pop();
      if (buffer === undefined || buffer.length < numel) buffer = new Float32Array(numel);
      try {
        return await mergeTensor(base, task, buffer, signal);
      } finally {
        free.push(buffer);
      }
    },
    close: () => Promise.resolve(),
  };
}

/** A message from a merge worker. */
export type WorkerReply = { ok: true; bytes: Uint8Array } | { ok: false; name: string; message: string };

/** Merges on `workers` threads, each with its own handle on the base and its own buffer. */
export function workerRunner(basePath: string, workers: number): MergeRunner {
  const fromSource = import.meta.url.endsWith('.ts');
  const url = new URL(`./merge-worker${fromSource ? '.ts' : '.js'}`, import.meta.url);
  const idle: Worker[] = [];
  const busy = new Map<Worker, { resolve: (b: Uint8Array) => void; reject: (e: Error) => void }>();
  const queue: { task: TensorTask; numel: number; resolve: (b: Uint8Array) => void; reject: (e: Error) => void }[] = [];
  const all: Worker[] = [];
  let failed: Error | undefined;
  const dispatch = (): void => {
    while (idle.length > 0 && queue.length > 0) {
      const w = idle.pop()!;
      const { task, numel, resolve, reject } = queue.shift()!;
      busy.set(w, { resolve, reject });
      w.postMessage({ task, numel });
    }
  };
  for (let i = 0; i < workers; i++) {
    const w = fromSource ? sourceWorker(url, basePath) : new Worker(url, { workerData: basePath });
    all.push(w);
    idle.push(w);
    w.on('message', (reply: WorkerReply) => {
      const p = busy.get(w)!;
      busy.delete(w);
      idle.push(w);
      if (reply.ok) p.resolve(reply.bytes);
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
    width: workers,
    run: (task, numel, signal) =>
      new Promise((resolve, reject) => {
        if (failed !== undefined) return reject(failed);
        if (signal?.aborted === true) return reject(signal.reason as Error);
        queue.push({ task, numel, resolve, reject });
        dispatch();
      }),
    // Terminating also stops a task in progress: an abort does not wait for the tensor at hand.
    close: async () => {
      await Promise.all(all.map((w) => w.terminate()));
      const stopped = new Error('merge workers stopped');
      for (const p of busy.values()) p.reject(stopped);
      for (const q of queue.splice(0)) q.reject(stopped);
    },
  };
}

/** Rebuilds a worker's error here, keeping format errors typed: their messages name the spool file and tensor. */
function revive(reply: { name: string; message: string }): Error {
  const err = /FormatError$|^ChecksumError$|^TruncatedError$|^UnsupportedDtypeError$/.test(reply.name) ? new FormatError(reply.message) : new Error(reply.message);
  err.name = reply.name;
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
