/** `dppa job cancel` and `dppa job resume`: an administrator's action on one job, printing the job afterwards. */
import { text } from '../../../proto/cli/flag-table.js';
import type { Job } from '../../../proto/gen/dppa/v1/jobs.js';
import { defineCommand, out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobFlag, jsonFlag } from '../job-id-flag.js';
import { jobJson, pauseText } from '../job-view.js';
import { adminToken, adminTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';
import type { DppaClient } from '../../sdk/client.js';

const JSON_HELP = 'the job afterwards, as in dppa job status --json';

/** One administrator's action: what it calls and how it tells the job afterwards. */
function jobAction(
  name: string,
  summary: string,
  description: string,
  refused: string,
  extra: { reason?: ReturnType<typeof text> },
  act: (client: DppaClient, jobId: string, v: { reason?: string | undefined }, signal: AbortSignal) => Promise<Job>,
  told: (job: Job) => string,
): Command {
  return defineCommand({
    name,
    summary,
    usage: `--server HOST:PORT --job ID${extra.reason === undefined ? '' : ' [--reason TEXT]'} [--json]`,
    description,
    flags: { ...jobFlag(), ...extra, ...serverFlags, ...adminTokenFlags, ...jsonFlag(JSON_HELP) },
    after: `Exit codes: 0 ok, 2 bad command line, 4 the server refused (${refused}) or failed, 130 interrupted.`,
    action: (v) =>
      withClient(clientOptions(v, adminToken(v)), async (client, signal) => {
        const job = await act(client, v.job, v, signal);
        out(v.json ? JSON.stringify(jobJson(job)) : told(job));
        return EXIT.ok;
      }),
  });
}

/** `dppa job cancel`: fails a job that has not merged yet. */
export const jobCancelCommand = jobAction(
  'job cancel',
  'fail a job that has not merged yet',
  'Fails a job that has not merged yet; the reason becomes its failure reason.',
  'e.g. the job has merged',
  { reason: text('TEXT', 'why (default "cancelled by the administrator")') },
  (client, jobId, v, signal) => client.cancelJob(jobId, v.reason ?? 'cancelled by the administrator', { signal }),
  (job) => `job ${job.id} cancelled: ${job.failureReason}`,
);

/** `dppa job resume`: tries a job paused by a storage failure again now. */
export const jobResumeCommand = jobAction(
  'job resume',
  'try a job paused by a storage failure (disk full) again now',
  `Tries a job paused by a storage failure on the server (its disk was full, say,
and space has been freed) again now, instead of at its next automatic attempt.
dppa job status shows whether a job is paused, and why. A job that is not
paused and has not ended is looked at again.`,
  'e.g. the job has merged or failed',
  {},
  (client, jobId, _v, signal) => client.resumeJob(jobId, { signal }),
  (job) =>
    `job ${job.id} resumed (${job.pause === undefined ? 'not paused' : `still paused: ${pauseText(job.pause)}`})`,
);
