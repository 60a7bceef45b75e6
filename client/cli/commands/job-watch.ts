import { custom } from '../../../proto/cli/flag-table.js';
import { JobState } from '../../../proto/gen/dppa/v1/jobs.js';
import { defineCommand, note, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobFlag, jsonFlag } from '../job-id-flag.js';
import { eventJson, eventText } from '../job-view.js';
import { anyToken, anyTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

function sequenceNumber(t: string): bigint {
  if (!/^\d+$/.test(t)) throw new Error(`expected an integer ≥ 0, got ${JSON.stringify(t)}`);
  return BigInt(t);
}

/** `dppa job watch`: see its help text. */
export const jobWatchCommand = defineCommand({
  name: 'job watch',
  summary: "print a job's events as they happen",
  usage: '--server HOST:PORT --job ID [--after-seq N] [--json]',
  description: `Prints a job's events, one line each, past ones first, then live ones, until
the job merges or fails (or Ctrl-C). Reconnects after a dropped connection
without losing or repeating events.`,
  flags: {
    ...jobFlag(),
    'after-seq': custom('N', 'only events after sequence number N (default 0: all)', sequenceNumber),
    ...serverFlags,
    ...anyTokenFlags,
    ...jsonFlag(
      'one JSON object per line: { jobId, seq, time, type, ... } where type is partyJoined, uploadProgress, uploadComplete, stateChanged (from, to: lower-case states), evaluationDone, factorsChosen, partyStopped (party, reason, discardedTensors), mergeProgress, paused (reason, attempts, since, nextAttemptAt: a storage failure on the server holds the job up), merged or failed',
    ),
  },
  after: `Exit codes: 0 the stream ended (the job merged), 2 bad command line, 4 the job failed or the
server refused or failed, 130 interrupted.`,
  action: (v) =>
    withClient(clientOptions(v, anyToken(v)), async (client, signal) => {
      const jobId = v.job;
      let failure: string | undefined;
      let final = false;
      for await (const ev of client.watchJob(jobId, { afterSeq: v['after-seq'] ?? 0n, signal })) {
        out(v.json ? JSON.stringify(eventJson(ev)) : eventText(ev));
        if (ev.failed !== undefined) failure = ev.failed.reason;
        if (ev.failed !== undefined || ev.merged !== undefined) final = true;
      }
      if (!final) {
        // A cluster ends the stream of a job that ended without its final event (lost in an outage): ask the job.
        const job = await client.getJob(jobId, { signal });
        if (job.state === JobState.JOB_STATE_FAILED) failure = job.failureReason;
      }
      if (failure !== undefined) {
        note(`dppa job watch: job ${jobId} failed: ${failure}`);
        return EXIT.server;
      }
      return EXIT.ok;
    }),
});
