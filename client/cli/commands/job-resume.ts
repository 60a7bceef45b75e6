import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobJson, pauseText } from '../job-view.js';
import { ADMIN_TOKEN_HELP, SERVER_HELP, adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa job resume --server HOST:PORT --job ID [--json]

Tries a job paused by a storage failure on the server (its disk was full, say,
and space has been freed) again now, instead of at its next automatic attempt.
dppa job status shows whether a job is paused, and why. A job that is not
paused and has not ended is looked at again.

Required:
  --job ID                 the job's id

${SERVER_HELP}
${ADMIN_TOKEN_HELP}

Output:
  --json                   the job afterwards, as in dppa job status --json
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 4 the server refused (e.g. the job has merged or failed) or failed, 130 interrupted.
`;

/** `dppa job resume`: see the help text above. */
export const jobResumeCommand: Command = {
  name: 'job resume',
  summary: 'try a job paused by a storage failure (disk full) again now',
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      job: { type: 'string' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    return withClient(clientOptions(v, adminToken(v)), async (client, signal) => {
      const job = await client.resumeJob(jobId, { signal });
      const pause = job.pause === undefined ? 'not paused' : `still paused: ${pauseText(job.pause)}`;
      out(v.json === true ? JSON.stringify(jobJson(job)) : `job ${job.id} resumed (${pause})`);
      return EXIT.ok;
    });
  },
};
