import { resolve } from 'node:path';
import { parse, required } from '../args.js';
import { out, type Command } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { formatBytes } from '../progress.js';
import { ADMIN_TOKEN_HELP, PARTY_TOKEN_HELP, SERVER_HELP, adminTokenFlags, anyToken, clientOptions, partyTokenFlags, serverFlags, withClient } from '../server-flags.js';

const help = `Usage: dppa pull --server HOST:PORT --job ID --out DIR [--token T]
       dppa pull --server HOST:PORT --job ID --base BASE --out DIR
       dppa pull --server HOST:PORT --job ID --patch --out FILE

Downloads a merged job's checkpoint into the new folder DIR. Files are
assembled in DIR.tmp-ID beside it, every chunk checked against its CRC-32C and
every file against its SHA-256, and the folder is renamed to DIR only when all
are complete: DIR never holds a partial checkpoint. After a dropped connection
the download resumes from the bytes on disk; so does a new run after Ctrl-C.

With --base, downloads the job's merged patch instead (the positions the merge
changed, with their merged values: a fraction of the checkpoint) and applies it
to the local copy of the base, writing DIR bit for bit as the server's dense
merge. A patch made for another base, or damaged, is refused (exit 3) and
nothing is written. With --patch, keeps the patch itself as FILE (apply it
later with dppa apply --patch).

Required:
  --job ID                 the job's id (the job must be merged)
  --out DIR                folder (or with --patch, file) to create; must not exist

Merged patch:
  --base BASE              base checkpoint folder the job merged into: download the patch and apply it
  --patch                  download the merged patch as the file --out

${SERVER_HELP}
${ADMIN_TOKEN_HELP}
${PARTY_TOKEN_HELP}
                           (a party may download when the job allows it; explicit flags
                           win, then $DPPA_ADMIN_TOKEN, then $DPPA_TOKEN)

Output:
  --json                   print { out, files: [{ path, size, sha256 }], bytesDownloaded, bytesResumed, applied? }
  -h, --help               this text

Exit codes: 0 ok, 2 bad command line (or DIR exists), 3 the patch is for another base or damaged
(--base), 4 the server refused or failed, or a file did not match its checksum, 130 interrupted
(run again to resume).
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
      base: { type: 'string' },
      patch: { type: 'boolean' },
      json: { type: 'boolean' },
    });
    const jobId = required(v.job, 'job');
    const dir = resolve(required(v.out, 'out'));
    if (v.patch === true && v.base !== undefined) throw new UsageError('--patch and --base: give one (--base downloads the patch and applies it)');
    const patch = v.patch === true ? { patch: true } : v.base === undefined ? {} : { base: resolve(v.base) };
    return withClient(clientOptions(v, anyToken(v)), async (client, signal, progress) => {
      const result = await client.pull(
        { jobId, out: dir, ...patch },
        { signal, onProgress: (p) => progress.update('pull', p.bytesDone, p.bytesTotal, `${p.filesDone}/${p.filesTotal} files ${p.file}${p.attempt > 1 ? ` (attempt ${p.attempt})` : ''}`) },
      );
      progress.done();
      if (v.json === true) {
        out(JSON.stringify(result));
      } else {
        const size = result.files.reduce((a, f) => a + f.size, 0);
        const resumed = result.bytesResumed > 0 ? ` (${formatBytes(result.bytesResumed)} resumed from an earlier run)` : '';
        const what = result.applied !== undefined
          ? `merged patch of ${formatBytes(size)} applied to ${v.base}: ${result.applied.tensorsPatched} tensors patched, ${result.applied.tensorsCopied} copied`
          : v.patch === true ? `merged patch, ${formatBytes(size)}, SHA-256 checked` : `${result.files.length} files, ${formatBytes(size)}, every SHA-256 checked`;
        out(`wrote ${result.out}: ${what}${resumed}`);
      }
      return EXIT.ok;
    });
  },
};
