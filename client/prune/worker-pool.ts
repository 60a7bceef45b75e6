/**
 * Runs tensor work on worker threads, each with its own handles on the two
 * checkpoints, or inline when one worker is asked for. Results do not depend
 * on the number of workers: every task is a pure function of one tensor.
 */
import { Worker } from 'node:worker_threads';
import { FormatError } from '../../proto/errors.js';
import type { ValueDtype } from '../../proto/gen/dppa/v1/sparse.js';
import type { DeltaSource, DeltaTensor, VocabMismatch } from './delta-source.js';
import { outliersAbove, type OutlierTotals } from './significance.js';
import { pruneTensor, tensorStats, type PruneSpec, type PrunedTensor, type TensorStats } from './tensor-work.js';

/** What every worker needs to open the checkpoints. */
export interface SourcePaths {
  base: string;
  finetuned: string;
  vocabMismatch: VocabMismatch;
}

/** A task for one tensor. */
export type TensorTask =
  | { op: 'stats'; tensor: DeltaTensor; linearFactor: number; layerFactor: number }
  | { op: 'outliers'; tensor: DeltaTensor; threshold: number }
  | { op: 'prune'; tensor: DeltaTensor; spec: PruneSpec; valueDtype: ValueDtype; finetunedValues: boolean };

/** The result of each kind of task. */
export interface TaskResult {
  stats: TensorStats;
  outliers: OutlierTotals;
  prune: PrunedTensor;
}

/** Runs one task against an open source: the single implementation both the pool and inline mode use. */
export async function runTask(source: DeltaSource, task: TensorTask): Promise<TaskResult[TensorTask['op']]> {
  const keep = task.op === 'prune' && task.finetunedValues;
  const { delta, finetuned } = await source.readDeltaAndFinetuned(task.tensor, keep);
  switch (task.op) {
    case 'stats':
      return tensorStats(delta, task.linearFactor, task.layerFactor);
    case 'outliers':
      return outliersAbove(delta, task.threshold);
    case 'prune':
      return pruneTensor(task.tensor.info.name, task.tensor.info.shape, delta, task.spec, task.valueDtype, finetuned);
  }
}

/** Runs tensor tasks on `workers` threads (inline when 1). */
export interface TensorRunner {
  run<T extends TensorTask>(task: T): Promise<TaskResult[T['op']]>;
  close(): Promise<void>;
}

/** Runs tasks in this thread on an already open source, one at a time so that one tensor is in memory. */
export function inlineRunner(source: DeltaSource): TensorRunner {
  let last: Promise<unknown> = Promise.resolve();
  return {
    run: <T extends TensorTask>(task: T) => {
      const next = last.then(
        () => runTask(source, task),
        () => runTask(source, task),
      );
      last = next;
      return next as Promise<TaskResult[T['op']]>;
    },
    close: () => Promise.resolve(),
  };
}

/** An error as it crosses the thread boundary: structured clone keeps only plain errors. */
export interface ErrorDescription {
  name: string;
  message: string;
}

/** Describes an error for postMessage. */
export function describeError(err: unknown): ErrorDescription {
  return err instanceof Error ? { name: err.name, message: err.message } : { name: 'Error', message: String(err) };
}

/** Rebuilds a worker's error in this thread, keeping format errors typed (their message already names file and tensor). */
function reviveError(d: ErrorDescription): Error {
  const err =
    d.name.endsWith('FormatError') || FORMAT_ERRORS.has(d.name) ? new FormatError(d.message) : new Error(d.message);
  err.name = d.name;
  return err;
}

const FORMAT_ERRORS = new Set(['UnsupportedDtypeError', 'ChecksumError', 'TruncatedError']);

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

/** Runs tasks on worker threads; each worker takes the next task when it is free. */
export function workerRunner(paths: SourcePaths, workers: number): TensorRunner {
  const fromSource = import.meta.url.endsWith('.ts');
  const url = new URL(`./prune-worker${fromSource ? '.ts' : '.js'}`, import.meta.url);
  const idle: Worker[] = [];
  const busy = new Map<Worker, Pending>();
  const queue: { task: TensorTask; pending: Pending }[] = [];
  let failed: Error | undefined;

  const dispatch = (): void => {
    while (idle.length > 0 && queue.length > 0) {
      const w = idle.pop()!;
      const { task, pending } = queue.shift()!;
      busy.set(w, pending);
      w.postMessage(task);
    }
  };
  const all: Worker[] = [];
  for (let i = 0; i < workers; i++) {
    const w = fromSource ? sourceWorker(url, paths) : new Worker(url, { workerData: paths });
    all.push(w);
    idle.push(w);
    w.on('message', (msg: { ok: true; value: unknown } | { ok: false; error: ErrorDescription }) => {
      const p = busy.get(w)!;
      busy.delete(w);
      idle.push(w);
      if (msg.ok) p.resolve(msg.value);
      else p.reject(reviveError(msg.error));
      dispatch();
    });
    w.on('error', (err) => {
      failed = err;
      busy.get(w)?.reject(err);
      busy.delete(w);
      for (const q of queue.splice(0)) q.pending.reject(err);
    });
  }
  return {
    run: <T extends TensorTask>(task: T) =>
      new Promise<TaskResult[T['op']]>((resolve, reject) => {
        if (failed !== undefined) return reject(failed);
        queue.push({ task, pending: { resolve: resolve as (v: unknown) => void, reject } });
        dispatch();
      }),
    close: async () => {
      await Promise.all(all.map((w) => w.terminate()));
    },
  };
}

/**
 * Running from TypeScript sources (tests, tsx): Node 20 does not pass tsx's
 * loader on to worker threads, so the worker registers it before importing.
 */
function sourceWorker(url: URL, workerData: SourcePaths): Worker {
  const boot = `import('tsx/esm/api').then((tsx) => { tsx.register(); return import(${JSON.stringify(url.href)}); })`;
  return new Worker(boot, { eval: true, workerData });
}
