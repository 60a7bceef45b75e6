import { resolve } from 'node:path';
import { text } from '../../../proto/cli/flag-table.js';
import { defineCommand, out } from '../command.js';
import { defaultWorkDir, evalFlags, keptDeltaPath, requireRemoteSearch, serveEvaluations } from '../eval-command.js';
import { EXIT } from '../exit-codes.js';
import { jsonFlag } from '../job-id-flag.js';
import { clientOptions, partyToken, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const REQUIRED = 'Required';

/** `dppa evaluate`: see its help text. */
export const evaluateCommand = defineCommand({
  name: 'evaluate',
  summary: "serve a job's DPA evaluation requests with a command (rejoin a search)",
  usage:
    "--server HOST:PORT --job ID --party P --token T --base DIR --finetuned DIR --eval-cmd 'CMD {model}' [--delta FILE.dppa] [--work-dir DIR]",
  description: `Serves this party's evaluation requests of a job's DPA factor search without
pushing again: to (re)join the search after a disconnection, or when the delta
was pushed by other means. Each candidate the server proposes is built here
(the dense reference is --finetuned as it is; an amplified one is --base plus
the amplified delta, written to DIR/candidate) and scored with CMD. Runs until
this party's search is over; reconnects by itself after a dropped connection.`,
  flags: {
    job: text('ID', "the job's id", { required: true, group: REQUIRED }),
    party: text('P', "this party's name in the job", { required: true, group: REQUIRED }),
    base: text('DIR', "base checkpoint (the job's base)", { required: true, group: REQUIRED, path: 'input' }),
    finetuned: text('DIR', "this party's fine-tuned checkpoint (the dense reference)", {
      required: true,
      group: REQUIRED,
      path: 'input',
    }),
    'eval-cmd': { ...evalFlags['eval-cmd'], required: true, group: REQUIRED },
    delta: text(
      'FILE',
      'the .dppa file this party uploaded (default DIR/delta.dppa, where dppa push --eval-cmd keeps it)',
      { group: 'Optional', path: 'input' },
    ),
    'eval-retries': evalFlags['eval-retries'],
    'work-dir': evalFlags['work-dir'],
    ...serverFlags,
    ...partyTokenFlags,
    ...jsonFlag('print { "evaluated": N, "answered": N } when the search is over (progress on stderr)'),
  },
  after: `Exit codes: 0 ok (the search is over), 2 bad command line, 3 missing or bad delta or checkpoints, 4 the server
refused or failed (the job failed, or does not ask this party), 5 the evaluation command kept failing
(this party's search stopped with its message; fix it and run again to resume), 130 interrupted
(run again to rejoin).`,
  async action(v) {
    const { job: jobId, party } = v;
    const workDir = resolve(v['work-dir'] ?? defaultWorkDir(jobId, party));
    const serve = {
      jobId,
      party,
      base: v.base,
      finetuned: v.finetuned,
      delta: resolve(v.delta ?? keptDeltaPath(workDir)),
      workDir,
      command: v['eval-cmd'],
      retries: v['eval-retries'],
      json: v.json,
    };
    return withClient(clientOptions(v, partyToken(v)), async (client, signal, progress) => {
      requireRemoteSearch(await client.getJob(jobId, { signal }), party);
      const result = await serveEvaluations(client, serve, signal, progress);
      if (serve.json) out(JSON.stringify(result));
      return EXIT.ok;
    });
  },
});
