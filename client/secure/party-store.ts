/**
 * The party's private state of a secure job (its protocol state with private keys and seed, its chosen factors),
 * kept in its working folder (mode 0600, replaced atomically) so that a restarted push resumes; never sent.
 */
import { chmod, mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { deserialize, serialize } from 'node:v8';
import type { PartyState } from '../../proto/secure/index.js';

/** What a party keeps of one secure job between runs. */
export interface StoredParty {
  version: 1;
  jobId: string;
  party: string;
  /** Factors chosen by the local search (or the job's fixed factors), once known. */
  factors?: number[];
  /** The protocol state (private keys, self-mask seed, shares held), once keys were made. */
  protocol?: PartyState;
  /** True once the server holds the whole masked vector. */
  maskedComplete?: boolean;
  /** Values clipped to the bound when the vector was coded. */
  clipped?: number;
}

/** The state file of a working folder. */
export function partyStatePath(workDir: string): string {
  return join(workDir, 'secure-party.state');
}

/**
 * The stored state of `party` in `jobId`, or a fresh one when there is none.
 * @throws Error when the file is unreadable or belongs to another job or party (naming the file).
 */
export async function loadParty(workDir: string, jobId: string, party: string): Promise<StoredParty> {
  const path = partyStatePath(workDir);
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, jobId, party };
    throw err;
  }
  let stored: StoredParty;
  try {
    stored = deserialize(bytes) as StoredParty;
  } catch (err) {
    throw new Error(`${path}: not a secure party state (${(err as Error).message})`, { cause: err });
  }
  if (stored.version !== 1) throw new Error(`${path}: state version ${String(stored.version)}, expected 1`);
  if (stored.jobId !== jobId || stored.party !== party)
    throw new Error(
      `${path} holds the state of party ${stored.party} in job ${stored.jobId}, not of ${party} in ${jobId}: use another working folder`,
    );
  return stored;
}

/** Writes the state (the folder made if missing): to a temporary file of mode 0600, synced, then renamed over the old one. */
export async function saveParty(workDir: string, stored: StoredParty): Promise<void> {
  await mkdir(workDir, { recursive: true });
  const path = partyStatePath(workDir);
  const tmp = `${path}.tmp-${process.pid}`;
  const file = await open(tmp, 'w', 0o600);
  try {
    await file.writeFile(serialize(stored));
    await file.sync();
  } catch (err) {
    await file.close();
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await file.close();
  // The mode of open() is masked by the umask; 0600 whatever it is.
  await chmod(tmp, 0o600);
  await rename(tmp, path);
}
