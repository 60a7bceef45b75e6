import { resolve } from 'node:path';
import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { formatBytes } from '../progress.js';
import { ADMIN_TOKEN_HELP, PARTY_TOKEN_HELP, SERVER_HELP, adminTokenFlags, anyToken, clientOptions, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa pull --server HOST:PORT --job ID --out DIR [--token T]

Downloads a merged job's checkpoint into the new folder DIR. Files are
assembled in DIR.tmp-ID beside it, every chunk checked against its CRC-32C and
every file against its SHA-256, and the folder is renamed to DIR only when all
are complete: DIR never holds a partial checkpoint. After a dropped connection
the download resumes from the bytes on disk; so does a new run after Ctrl-C.

Required:
  --job ID                 the job's id (the job must be merged)
  --out DIR                folder to create; must not exist

${SERVER_HELP}
${ADMIN_TOKEN_HELP}
${PARTY_TOKEN_HELP}
                           (a party may download when the job allows it; explicit flags
                           win, then $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN)

Output:
  --json                   print { out, files: [{ path, size, sha256 }], bytesDownloaded, bytesResumed }
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line (or DIR exists), 4 the server refused or failed, or a file
did not match its checksum, 130 interrupted (run again to resume).
`;

/** `dppa pull`: see the help text above. */
export const pullCommand: Command = {
  name: 'pull',
  summary: "download a merged job's checkpoint (resumable, verified)",
  help,
  async run(argv) {
    const { values: v } = parse(argv, {
      ...serverFlags,
      ...adminTokenFlags,
      ...partyTokenFlags,
      job: { type: 'string' },
      out: { type: 'string' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    const dir = resolve(required(v.out, 'out'));
    return withClient(clientOptions(v, anyToken(v)), async (client, signal, progress) => {
      const result = await client.pull(
        { jobId, out: dir },
        { signal, onProgress: (p) => progress.update('pull', p.bytesDone, p.bytesTotal, `${p.filesDone}/${p.filesTotal} files ${p.file}${p.attempt > 1 ? ` (attempt ${p.attempt})` : ''}`) },
      );
      progress.done();
      if (v.json === true) {
        out(JSON.stringify(result));
      } else {
        const size = result.files.reduce((a, f) => a + f.size, 0);
        const resumed = result.bytesResumed > 0 ? ` (${formatBytes(result.bytesResumed)} resumed from an earlier run)` : '';
        out(`wrote ${result.out}: ${result.files.length} files, ${formatBytes(size)}, every SHA-256 checked${resumed}`);
      }
      return EXIT.ok;
    });
  },
};
