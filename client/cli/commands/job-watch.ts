import { parse, required } from '../args.js';
import { note, out, type Command } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { eventJson, eventText } from '../job-view.js';
import { JobState } from '../../../proto/gen/dppa/v1/jobs.js';
import { ADMIN_TOKEN_HELP, PARTY_TOKEN_HELP, SERVER_HELP, adminTokenFlags, anyToken, clientOptions, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa job watch --server HOST:PORT --job ID [--after-seq N] [--json]

Prints a job's events, one line each, past ones first, then live ones, until
the job merges or fails (or Ctrl-C). Reconnects after a dropped connection
without losing or repeating events.

Required:
  --job ID                 the job's id

Options:
  --after-seq N            only events after sequence number N (default 0: all)

${SERVER_HELP}
${ADMIN_TOKEN_HELP}
${PARTY_TOKEN_HELP}

Output:
  --json                   one JSON object per line: { jobId, seq, time, type, ... } where type is
                           partyJoined, uploadProgress, uploadComplete, stateChanged (from, to:
                           lower-case states), evaluationDone, factorsChosen, partyStopped
                           (party, reason, discardedTensors), mergeProgress, paused (reason,
                           attempts, since, nextAttemptAt: a storage failure on the server holds
                           the job up), merged or failed
  -h, --help               this text

Exit codes: 0 the stream ended (the job merged), 2 bad command line, 4 the job failed or the
server refused or failed, 130 interrupted.
`;

/** `dppa job watch`: see the help text above. */
export const jobWatchCommand: Command = {
  name: 'job watch',
  summary: "print a job's events as they happen",
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      ...partyTokenFlags,
      job: { type: 'string' },
      'after-seq': { type: 'string' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    let afterSeq = 0n;
    if (v['after-seq'] !== undefined) {
      if (!/^\d+$/.test(v['after-seq'])) throw new UsageError(`--after-seq: expected an integer ≥ 0, got ${JSON.stringify(v['after-seq'])}`);
      afterSeq = BigInt(v['after-seq']);
    }
    return withClient(clientOptions(v, anyToken(v)), async (client, signal) => {
      let failure: string | undefined;
      let final = false;
      for await (const ev of client.watchJob(jobId, { afterSeq, signal })) {
        out(v.json === true ? JSON.stringify(eventJson(ev)) : eventText(ev));
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
    });
  },
};
