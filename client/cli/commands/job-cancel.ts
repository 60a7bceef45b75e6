import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobJson } from '../job-view.js';
import { ADMIN_TOKEN_HELP, SERVER_HELP, adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa job cancel --server HOST:PORT --job ID [--reason TEXT] [--json]

Fails a job that has not merged yet; the reason becomes its failure reason.

Required:
  --job ID                 the job's id

Options:
  --reason TEXT            why (default "cancelled by the administrator")

${SERVER_HELP}
${ADMIN_TOKEN_HELP}

Output:
  --json                   the job afterwards, as in dppa job status --json
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 4 the server refused (e.g. the job has merged) or failed, 130 interrupted.
`;

/** `dppa job cancel`: see the help text above. */
export const jobCancelCommand: Command = {
  name: 'job cancel',
  summary: 'fail a job that has not merged yet',
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      job: { type: 'string' },
      reason: { type: 'string' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    return withClient(clientOptions(v, adminToken(v)), async (client, signal) => {
      const job = await client.cancelJob(jobId, v.reason ?? 'cancelled by the administrator', { signal });
      out(v.json === true ? JSON.stringify(jobJson(job)) : `job ${job.id} cancelled: ${job.failureReason}`);
      return EXIT.ok;
    });
  },
};
