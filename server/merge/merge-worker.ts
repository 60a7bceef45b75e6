/** Worker thread entry of the merge: opens the base once, then merges one tensor per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { AccumulatorPool, OutputPool, workerFailure, type WorkerReply, type WorkerRequest } from './merge-runner.js';
import { mergeTensorOutputs } from './tensor-merge.js';

const port = parentPort!;
const baseReady = Checkpoint.open(workerData as string);
const accumulators = new AccumulatorPool();
const outputs = new OutputPool();

port.on('message', (msg: WorkerRequest) => {
  if ('reuse' in msg) {
    outputs.give(msg.reuse);
    return;
  }
  const { task, numel } = msg;
  baseReady
    .then((base) =>
      accumulators.with(numel, (acc) =>
        outputs.fillWith(async (out) => (await mergeTensorOutputs(base, task, acc, undefined, out)).bytes),
      ),
    )
    .then(
      (bytes) => {
        // Handed over, not copied: either the reused block or fresh memory of the result's own.
        const owned = bytes.byteOffset === 0 ? bytes : bytes.slice();
        const reply: WorkerReply = {
          ok: true,
          buffer: owned.buffer as ArrayBuffer,
          byteLength: owned.byteLength,
        };
        port.postMessage(reply, [reply.buffer]);
      },
      (err: unknown) => port.postMessage({ ok: false, ...workerFailure(err) } satisfies WorkerReply),
    );
});
