import { parse } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobJson } from '../job-view.js';
import { ADMIN_TOKEN_HELP, SERVER_HELP, adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';
import { jobStateName } from '../../sdk/jobs.js';

const help = `Usage: dppa job list --server HOST:PORT [--json]

Lists every job on the server, newest first: id, state, parties' uploads, label.

${SERVER_HELP}
${ADMIN_TOKEN_HELP}

Output:
  --json                   a JSON array of jobs, each as in dppa job status --json
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed, 130 interrupted.
`;

/** `dppa job list`: see the help text above. */
export const jobListCommand: Command = {
  name: 'job list',
  summary: 'list every job on the server',
  help,
  async run(argv) {
    const { values: v } = parse(argv, { ...serverFlags, ...adminTokenFlags, json: { type: 'boolean' } });
    return withClient(clientOptions(v, adminToken(v)), async (client, signal) => {
      const jobs = await client.listJobs({ signal });
      if (v.json === true) {
        out(JSON.stringify(jobs.map(jobJson)));
        return EXIT.ok;
      }
      if (jobs.length === 0) out('no jobs');
      const width = Math.max(2, ...jobs.map((j) => j.id.length));
      for (const j of jobs) {
        const done = j.parties.filter((p) => p.uploadComplete).length;
        const label = j.label === '' ? '' : `  "${j.label}"`;
        out(`${j.id.padEnd(width)}  ${jobStateName(j.state).padEnd(10)}  ${done}/${j.parties.length} uploads  ${j.createdAt}${label}`);
      }
      return EXIT.ok;
    });
  },
};
