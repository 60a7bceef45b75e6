import { resolve } from 'node:path';
import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EVAL_HELP, defaultWorkDir, evalFlags, evalRetries, keptDeltaPath, requireRemoteSearch, serveEvaluations } from '../eval-command.js';
import { EXIT } from '../exit-codes.js';
import { PARTY_TOKEN_HELP, SERVER_HELP, clientOptions, partyToken, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa evaluate --server HOST:PORT --job ID --party P --token T --base DIR --finetuned DIR
                     --eval-cmd 'CMD {model}' [--delta FILE.dppa] [--work-dir DIR]

Serves this party's evaluation requests of a job's DPA factor search without
pushing again: to (re)join the search after a disconnection, or when the delta
was pushed by other means. Each candidate the server proposes is built here
(the dense reference is --finetuned as it is; an amplified one is --base plus
the amplified delta, written to DIR/candidate) and scored with CMD. Runs until
this party's search is over; reconnects by itself after a dropped connection.

Required:
  --job ID                 the job's id
  --party P                this party's name in the job
  --base DIR               base checkpoint (the job's base)
  --finetuned DIR          this party's fine-tuned checkpoint (the dense reference)
  --eval-cmd CMD           see below

Optional:
  --delta FILE             the .dppa file this party uploaded (default DIR/delta.dppa, where
                           dppa push --eval-cmd keeps it)
${EVAL_HELP}

${SERVER_HELP}
${PARTY_TOKEN_HELP}

Output:
  --json                   print { "evaluated": N, "answered": N } when the search is over
                           (progress on stderr)
  -h, --help               this text

Exit codes: 0 ok (the search is over), 2 bad command line, 3 bad delta or checkpoints, 4 the server
refused or failed (the job failed, or does not ask this party), 5 the evaluation command kept failing
(this party's search stopped with its message; fix it and run again to resume), 130 interrupted
(run again to rejoin).
`;

/** `dppa evaluate`: see the help text above. */
export const evaluateCommand: Command = {
  name: 'evaluate',
  summary: "serve a job's DPA evaluation requests with a command (rejoin a search)",
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...partyTokenFlags,
      job: { type: 'string' },
      party: { type: 'string' },
      base: { type: 'string' },
      finetuned: { type: 'string' },
      delta: { type: 'string' },
      ...evalFlags,
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    const party = required(v.party, 'party');
    const workDir = resolve(v['work-dir'] ?? defaultWorkDir(jobId, party));
    const serve = {
      jobId,
      party,
      base: required(v.base, 'base'),
      finetuned: required(v.finetuned, 'finetuned'),
      delta: resolve(v.delta ?? keptDeltaPath(workDir)),
      workDir,
      command: required(v['eval-cmd'], 'eval-cmd'),
      retries: evalRetries(v['eval-retries']),
      json: v.json === true,
    };
    return withClient(clientOptions(v, partyToken(v)), async (client, signal, progress) => {
      requireRemoteSearch(await client.getJob(jobId, { signal }), party);
      const result = await serveEvaluations(client, serve, signal, progress);
      if (serve.json) out(JSON.stringify(result));
      return EXIT.ok;
    });
  },
};
