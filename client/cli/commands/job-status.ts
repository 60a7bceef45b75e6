import { defineCommand, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobFlag, jsonFlag } from '../job-id-flag.js';
import { jobJson, jobText } from '../job-view.js';
import { anyToken, anyTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

/** `dppa job status`: see its help text. */
export const jobStatusCommand = defineCommand({
  name: 'job status',
  summary: "print a job's state, parties, evaluations and failure reason",
  usage: '--server HOST:PORT --job ID [--json]',
  description: `Prints a job: its state (collecting, dpa, merging, merged or failed), settings,
each party's upload and factors, the DPA evaluations, why it failed, and why it
is paused (a storage failure on the server, e.g. a full disk: see dppa job resume).`,
  flags: {
    ...jobFlag("the job's id (from dppa job create or dppa job list)"),
    ...serverFlags,
    ...anyTokenFlags,
    ...jsonFlag(
      'one JSON object: { jobId, label, state, basePath, baseFingerprint, rate, method, dpa, merge, maxAbsValue, parties, evaluations, failureReason, pause, createdAt, updatedAt }; state is lower-case; pause is null or { reason, attempts, since, nextAttemptAt }',
    ),
  },
  after:
    'Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed (unknown job, bad token), 130 interrupted.',
  action: (v) =>
    withClient(clientOptions(v, anyToken(v)), async (client, signal) => {
      const job = await client.getJob(v.job, { signal });
      out(v.json ? JSON.stringify(jobJson(job)) : jobText(job));
      return EXIT.ok;
    }),
});
