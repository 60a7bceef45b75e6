/** Worker thread entry of the merge: opens the base once, then merges one tensor per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { AccumulatorPool, workerFailure, type WorkerReply, type WorkerRequest } from './merge-runner.js';
import { accumulatorElements, mergeTensorOutputs } from './tensor-merge.js';

const port = parentPort!;
const baseReady = Checkpoint.open(workerData as string);
const accumulators = new AccumulatorPool();

port.on('message', (msg: WorkerRequest) => {
  if ('reuse' in msg) {
    accumulators.give(msg.reuse);
    return;
  }
  const { task, numel } = msg;
  let acc: Float32Array | undefined;
  baseReady
    .then((base) => {
      acc = accumulators.take(Math.max(numel, accumulatorElements(base.info(task.name), task)));
      return mergeTensorOutputs(base, task, acc);
    })
    .then(
      ({ bytes }) => {
        // Handed over, not copied: the result is the start of the accumulator's memory, which comes back to reuse.
        const reply: WorkerReply = { ok: true, buffer: acc!.buffer as ArrayBuffer, byteLength: bytes.byteLength };
        port.postMessage(reply, [reply.buffer]);
      },
      (err: unknown) => {
        if (acc !== undefined) accumulators.give(acc.buffer as ArrayBuffer);
        port.postMessage({ ok: false, ...workerFailure(err) } satisfies WorkerReply);
      },
    );
});
