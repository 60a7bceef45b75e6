import { defineCommand, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jsonFlag } from '../job-id-flag.js';
import { jobJson } from '../job-view.js';
import { adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';
import { jobStateName } from '../../sdk/jobs.js';

/** `dppa job list`: see its help text. */
export const jobListCommand = defineCommand({
  name: 'job list',
  summary: 'list every job on the server',
  usage: '--server HOST:PORT [--json]',
  description: "Lists every job on the server, newest first: id, state, parties' uploads, label.",
  flags: { ...serverFlags, ...adminTokenFlags, ...jsonFlag('a JSON array of jobs, each as in dppa job status --json') },
  after: 'Exit codes: 0 ok, 2 bad command line, 4 the server refused or failed, 130 interrupted.',
  action: (v) =>
    withClient(clientOptions(v, adminToken(v)), async (client, signal) => {
      const jobs = await client.listJobs({ signal });
      if (v.json) {
        out(JSON.stringify(jobs.map(jobJson)));
        return EXIT.ok;
      }
      if (jobs.length === 0) out('no jobs');
      const width = Math.max(2, ...jobs.map((j) => j.id.length));
      for (const j of jobs) {
        const done = j.parties.filter((p) => p.uploadComplete).length;
        const label = j.label === '' ? '' : `  "${j.label}"`;
        out(
          `${j.id.padEnd(width)}  ${jobStateName(j.state).padEnd(10)}  ${done}/${j.parties.length} uploads  ${j.createdAt}${label}`,
        );
      }
      return EXIT.ok;
    }),
});
