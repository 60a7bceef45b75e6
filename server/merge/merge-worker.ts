/** Worker thread entry of the merge: opens the base once, then merges one tensor per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { Checkpoint } from '../../proto/safetensors/index.js';
import type { WorkerReply } from './merge-runner.js';
import { mergeTensor, type TensorTask } from './tensor-merge.js';

const port = parentPort!;
const baseReady = Checkpoint.open(workerData as string);
let buffer = new Float32Array(0);

port.on('message', ({ task, numel }: { task: TensorTask; numel: number }) => {
  baseReady
    .then((base) => {
      if (buffer.length < numel) buffer = new Float32Array(numel);
      return mergeTensor(base, task, buffer);
    })
    .then(
      (bytes) => {
        // The result is fresh memory of its own: hand it over instead of copying it.
        const owned = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? bytes : bytes.slice();
        port.postMessage({ ok: true, bytes: owned } satisfies WorkerReply, [owned.buffer as ArrayBuffer]);
      },
      (err: unknown) => {
        const e = err instanceof Error ? err : new Error(String(err));
        port.postMessage({ ok: false, name: e.name, message: e.message } satisfies WorkerReply);
      },
    );
});
