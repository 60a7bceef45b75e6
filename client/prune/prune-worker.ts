/** Worker thread entry: opens the checkpoints once, then runs tensor tasks as they come. */
import { parentPort, workerData } from 'node:worker_threads';
import { DeltaSource } from './delta-source.js';
import { describeError, runTask, type SourcePaths, type TensorTask } from './worker-pool.js';

const paths = workerData as SourcePaths;
const port = parentPort!;
const sourceReady = DeltaSource.open(paths.base, paths.finetuned, { vocabMismatch: paths.vocabMismatch });

port.on('message', (task: TensorTask) => {
  sourceReady
    .then((source) => runTask(source, task))
    .then(
      (value) => port.postMessage({ ok: true, value }),
      (error: unknown) => port.postMessage({ ok: false, error: describeError(error) }),
    );
});
