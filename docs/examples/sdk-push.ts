/**
 * The client SDK end to end against a running server: create a job, push two parties' deltas, watch, pull.
 * Arguments: docs/design/examples.md.
 *
 *   DPPA_ADMIN_TOKEN=… npx tsx docs/examples/sdk-push.ts HOST:PORT SERVER_BASE_DIR BASE_DIR FT_MATH_DIR FT_LAW_DIR [OUT_DIR]
 */
import { DppaClient, JobState, jobStateName, type DppaClientOptions } from '../../client/index.js';

const [address, serverBase, base, ftMath, ftLaw, out = 'merged'] = process.argv.slice(2);
const adminToken = process.env.DPPA_ADMIN_TOKEN;
if (
  address === undefined ||
  serverBase === undefined ||
  base === undefined ||
  ftMath === undefined ||
  ftLaw === undefined ||
  adminToken === undefined
) {
  console.error(
    'usage: DPPA_ADMIN_TOKEN=… npx tsx docs/examples/sdk-push.ts HOST:PORT SERVER_BASE_DIR BASE_DIR FT_MATH_DIR FT_LAW_DIR [OUT_DIR]',
  );
  process.exit(2);
}

// Plaintext is allowed to loopback only; give `tls: { ca: 'ca.pem' }` for a remote server.
const connection: Omit<DppaClientOptions, 'token'> = { address, retry: { attempts: 8 } };
const admin = new DppaClient({ ...connection, token: adminToken });
try {
  // 1. The admin creates the job: every party must prune at 80% with DP, which keeps two partitions (levels 0.9 and
  //    0.8, docs/algorithm.md); DPA factors fixed for the example, one per partition.
  const { job, tokens } = await admin.createJob({
    basePath: serverBase,
    parties: ['math', 'law'],
    rate: 0.8,
    dpa: { fixed: { factors: [1.8, 1.2] } },
    merge: { weights: { math: 1, law: 1 } },
    label: 'sdk example',
  });
  console.log(`job ${job.id} created`);

  // 2. Each party pushes with its own token; rate and method come from the job.
  //    A dropped connection is retried and resumed: only the tensors the server lacks are sent again.
  await Promise.all(
    (
      [
        ['math', ftMath],
        ['law', ftLaw],
      ] as const
    ).map(async ([party, finetuned]) => {
      const client = new DppaClient({ ...connection, token: tokens[party]! });
      try {
        const state = await client.push(
          { jobId: job.id, party, base, finetuned },
          {
            onProgress: (p) =>
              p.phase === 'upload' &&
              p.tensorsDone === p.tensorsTotal &&
              console.log(`${party}: all ${p.tensorsTotal} tensors sent`),
          },
        );
        console.log(`${party}: the server holds ${state.tensorsReceived.length}/${state.tensorsExpected} tensors`);
      } finally {
        client.close();
      }
    }),
  );

  // 3. The admin watches the job until the server ends the stream (merged or failed).
  for await (const event of admin.watchJob(job.id)) {
    if (event.stateChanged !== undefined) console.log(`state → ${jobStateName(event.stateChanged.to)}`);
    if (event.failed !== undefined) throw new Error(`job failed: ${event.failed.reason}`);
  }
  const done = await admin.getJob(job.id);
  if (done.state !== JobState.JOB_STATE_MERGED) throw new Error(`job ended ${jobStateName(done.state)}`);

  // 4. Download the merged checkpoint; `out` appears only once every file is verified.
  const pulled = await admin.pull(
    { jobId: job.id, out },
    {
      onProgress: (p) => p.bytesDone === p.bytesTotal && console.log(`downloaded ${p.filesDone}/${p.filesTotal} files`),
    },
  );
  console.log(`merged checkpoint in ${pulled.out}: ${pulled.files.map((f) => f.path).join(', ')}`);
} finally {
  admin.close();
}
