import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { text, toggle } from '../../../proto/cli/flag-table.js';
import { defineCommand, out } from '../command.js';
import { EXIT, UsageError } from '../exit-codes.js';
import { jobFlag, jsonFlag } from '../job-id-flag.js';
import { formatBytes } from '../progress.js';
import { anyToken, anyTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

/** `dppa pull`: see its help text. */
export const pullCommand = defineCommand({
  name: 'pull',
  summary: "download a merged job's checkpoint (resumable, verified)",
  usage:
    '--server HOST:PORT --job ID --out DIR [--token T]\ndppa pull --server HOST:PORT --job ID --base BASE --out DIR\ndppa pull --server HOST:PORT --job ID --patch --out FILE',
  description: `Downloads a merged job's checkpoint into the new folder DIR. Files are
assembled in a folder beside it, every chunk checked against its CRC-32C and
every file against its SHA-256, and the folder is renamed to DIR only when all
are complete: DIR never holds a partial checkpoint. After a dropped connection
the download resumes from the bytes on disk; so does a new run after Ctrl-C.

With --base, downloads the job's merged patch instead (the positions the merge
changed, with their merged values: a fraction of the checkpoint) and applies it
to the local copy of the base, writing DIR bit for bit as the server's dense
merge. A patch made for another base, or one that does not fit the base, is
refused (exit 3) and nothing is written; so is a download that does not match
its checksum (exit 4). With --patch, keeps the patch itself as FILE (apply it
later with dppa apply --patch).`,
  flags: {
    ...jobFlag("the job's id (the job must be merged)"),
    out: text('DIR', 'folder (or with --patch, file) to create', {
      required: true,
      group: 'Required',
      path: 'output',
      whenExists: 'pull creates a new folder (with --patch, a new file)',
    }),
    overwrite: toggle('replace DIR if it exists, once the download is complete and verified', { group: 'Required' }),
    base: text('BASE', "local copy of the job's base: download the merged patch and apply it to it", {
      group: 'Merged patch',
      path: 'input',
    }),
    patch: toggle('download the merged patch as the file --out', { group: 'Merged patch' }),
    ...serverFlags,
    ...anyTokenFlags,
    ...jsonFlag('print { out, files: [{ path, size, sha256 }], bytesDownloaded, bytesResumed, applied? }'),
  },
  after: `Exit codes: 0 ok, 2 bad command line (or DIR exists), 3 the patch is for another base or does
not fit it (--base), 4 the server refused or failed, or a file (or the patch) did not match its checksum,
130 interrupted (run again to resume).`,
  action: (v) => {
    if (v.patch && v.base !== undefined)
      throw new UsageError('--patch and --base: give one (--base downloads the patch and applies it)');
    const patch = v.patch ? { patch: true } : v.base === undefined ? {} : { base: resolve(v.base) };
    return withClient(clientOptions(v, anyToken(v)), async (client, signal, progress) => {
      const dir = resolve(v.out);
      // With --overwrite, the download goes to a folder of its own, which replaces DIR once complete.
      const replacing = v.overwrite && existsSync(dir);
      const into = replacing ? `${dir}.new-${v.job.replace(/[^A-Za-z0-9_-]/g, '_')}` : dir;
      const result = await client.pull(
        { jobId: v.job, out: into, ...patch },
        {
          signal,
          onProgress: (p) =>
            progress.update(
              'pull',
              p.bytesDone,
              p.bytesTotal,
              `${p.filesDone}/${p.filesTotal} files ${p.file}${p.attempt > 1 ? ` (attempt ${p.attempt})` : ''}`,
            ),
        },
      );
      progress.done();
      if (replacing) {
        const old = `${dir}.old-${randomBytes(4).toString('hex')}`;
        await rename(dir, old);
        await rename(into, dir);
        await rm(old, { recursive: true, force: true });
      }
      const shown = { ...result, out: dir };
      if (v.json) {
        out(JSON.stringify(shown));
      } else {
        const size = shown.files.reduce((a, f) => a + f.size, 0);
        const resumed =
          shown.bytesResumed > 0 ? ` (${formatBytes(shown.bytesResumed)} resumed from an earlier run)` : '';
        const what =
          shown.applied !== undefined
            ? `merged patch of ${formatBytes(size)} applied to ${v.base}: ${shown.applied.tensorsPatched} tensors patched, ${shown.applied.tensorsCopied} copied`
            : v.patch
              ? `merged patch, ${formatBytes(size)}, SHA-256 checked`
              : `${shown.files.length} files, ${formatBytes(size)}, every SHA-256 checked`;
        out(`wrote ${shown.out}: ${what}${resumed}`);
      }
      return EXIT.ok;
    });
  },
});
