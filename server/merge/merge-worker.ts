/** Worker thread entry of the merge: opens the base once, then merges one tensor per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { OutputPool, type WorkerReply, type WorkerRequest } from './merge-runner.js';
import { mergeTensor } from './tensor-merge.js';

const port = parentPort!;
const baseReady = Checkpoint.open(workerData as string);
let buffer = new Float32Array(0);
const outputs = new OutputPool();

port.on('message', (msg: WorkerRequest) => {
  if ('reuse' in msg) {
    outputs.give(msg.reuse);
    return;
  }
  const { task, numel } = msg;
  baseReady
    .then((base) => {
      if (buffer.length < numel) buffer = new Float32Array(numel);
      return outputs.fillWith((out) => mergeTensor(base, task, buffer, undefined, out));
    })
    .then(
      (bytes) => {
        // Handed over, not copied: either the reused block or fresh memory of the result's own.
        const owned = bytes.byteOffset === 0 ? bytes : bytes.slice();
        const reply: WorkerReply = { ok: true, buffer: owned.buffer as ArrayBuffer, byteLength: owned.byteLength };
        port.postMessage(reply, [reply.buffer]);
      },
      (err: unknown) => {
        const e = err instanceof Error ? err : new Error(String(err));
        port.postMessage({ ok: false, name: e.name, message: e.message } satisfies WorkerReply);
      },
    );
});
