import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { text, toggle } from '../../../proto/cli/flag-table.js';
import { defineCommand, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { jobFlag, jsonFlag } from '../job-id-flag.js';
import { formatBytes } from '../progress.js';
import { anyToken, anyTokenFlags, clientOptions, serverFlags, withClient } from '../server-flags.js';

/** `dppa pull`: see its help text. */
export const pullCommand = defineCommand({
  name: 'pull',
  summary: "download a merged job's checkpoint (resumable, verified)",
  usage: '--server HOST:PORT --job ID --out DIR [--token T]',
  description: `Downloads a merged job's checkpoint into the new folder DIR. Files are
assembled in a folder beside it, every chunk checked against its CRC-32C and
every file against its SHA-256, and the folder is renamed to DIR only when all
are complete: DIR never holds a partial checkpoint. After a dropped connection
the download resumes from the bytes on disk; so does a new run after Ctrl-C.`,
  flags: {
    ...jobFlag("the job's id (the job must be merged)"),
    out: text('DIR', 'folder to create', { required: true, group: 'Required', path: 'output', whenExists: 'pull creates a new folder' }),
    overwrite: toggle('replace DIR if it exists, once the download is complete and verified', { group: 'Required' }),
    ...serverFlags,
    ...anyTokenFlags,
    ...jsonFlag('print { out, files: [{ path, size, sha256 }], bytesDownloaded, bytesResumed }'),
  },
  after: `Exit codes: 0 ok, 2 bad command line (or DIR exists), 4 the server refused or failed, or a file
did not match its checksum, 130 interrupted (run again to resume).`,
  action: (v) =>
    withClient(clientOptions(v, anyToken(v)), async (client, signal, progress) => {
      const dir = resolve(v.out);
      // With --overwrite, the download goes to a folder of its own, which replaces DIR once complete.
      const replacing = v.overwrite && existsSync(dir);
      const into = replacing ? `${dir}.new-${v.job.replace(/[^A-Za-z0-9_-]/g, '_')}` : dir;
      const result = await client.pull(
        { jobId: v.job, out: into },
        { signal, onProgress: (p) => progress.update('pull', p.bytesDone, p.bytesTotal, `${p.filesDone}/${p.filesTotal} files ${p.file}${p.attempt > 1 ? ` (attempt ${p.attempt})` : ''}`) },
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
        const resumed = shown.bytesResumed > 0 ? ` (${formatBytes(shown.bytesResumed)} resumed from an earlier run)` : '';
        out(`wrote ${shown.out}: ${shown.files.length} files, ${formatBytes(size)}, every SHA-256 checked${resumed}`);
      }
      return EXIT.ok;
    }),
});
