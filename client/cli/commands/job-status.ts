import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobJson, jobText } from '../job-view.js';
import { ADMIN_TOKEN_HELP, PARTY_TOKEN_HELP, SERVER_HELP, adminTokenFlags, anyToken, clientOptions, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa job status --server HOST:PORT --job ID [--json]

Prints a job: its state (collecting, dpa, merging, merged or failed), settings,
each party's upload and factors, the DPA evaluations, why it failed, and why it
is paused (a storage failure on the server, e.g. a full disk: see dppa job resume).

Required:
  --job ID                 the job's id (from dppa job create or dppa job list)

${SERVER_HELP}
${ADMIN_TOKEN_HELP}
${PARTY_TOKEN_HELP}
                           (a party may see its own job; explicit flags win, then
                           $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN)

Output:
  --json                   one JSON object: { jobId, label, state, basePath, baseFingerprint, rate,
                           method, dpa, merge, maxAbsValue, parties, evaluations, failureReason, pause,
                           createdAt, updatedAt }; state is lower-case; pause is null or
                           { reason, attempts, since, nextAttemptAt }
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed (unknown job, bad token), 130 interrupted.
`;

/** `dppa job status`: see the help text above. */
export const jobStatusCommand: Command = {
  name: 'job status',
  summary: "print a job's state, parties, evaluations and failure reason",
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      ...partyTokenFlags,
      job: { type: 'string' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    return withClient(clientOptions(v, anyToken(v)), async (client, signal) => {
      const job = await client.getJob(jobId, { signal });
      out(v.json === true ? JSON.stringify(jobJson(job)) : jobText(job));
      return EXIT.ok;
    });
  },
};
