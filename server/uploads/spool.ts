/**
 * Uploads on disk, per job and party (`jobs/<id>/uploads/<party>/`): the header, one `.dppa` file per completed
 * tensor, and what was discarded after the merge. See docs/design/spool.md.
 */
import { mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import pMap from 'p-map';
import { JobState } from '../../proto/gen/dppa/v1/jobs.js';
import { DeltaHeader, type TensorPlan } from '../../proto/gen/dppa/v1/sparse.js';
import { DeltaFileWriter } from '../../proto/sparse/index.js';
import { TEMP_MARK, writeFileDurably } from '../durable-write.js';
import { discardSecureData } from '../secure/secure-sum.js';
import { secureDir } from './masked-spool.js';
import { sizeOf } from '../../proto/safetensors/fs-util.js';
import { LOAD_CONCURRENCY, type JobStore, type StoredJob } from '../jobs/job-store.js';
import type { Logger } from '../log.js';

const TENSOR_FILE = /^(\d+)\.dppa$/;
/** With a shared folder, a temporary file untouched this long was left by a replica that died: deleted at start. */
const STALE_TEMP_MS = 10 * 60 * 1000;
const HEADER_FILE = 'header.json';
const DISCARDED_FILE = 'discarded.json';

/** A tensor held in the spool. */
export interface HeldTensor {
  name: string;
  /** Index in the header's `tensors`. */
  index: number;
  /** Size of its spool file. */
  bytes: number;
  /** Path of its spool file. */
  file: string;
}

/** The hold of an upload stream on its party's spool. */
export interface UploadSlot {
  /** Ends the stream holding the slot: its call fails with ABORTED, and it releases the slot. */
  takeOver(): void;
  /** Resolves once the stream has released the slot (its open tensor discarded, completed ones closed). */
  readonly released: Promise<void>;
}

/** The spooled upload of one party of one job. */
export class PartySpool {
  /** The accepted header, once one arrived. */
  header: DeltaHeader | undefined;
  /** Tensors held, in the order they arrived (after a restart: in plan order). */
  readonly held = new Map<string, HeldTensor>();
  /** The upload stream of this party that is open, if any: one at a time, a newer one takes over. */
  upload: UploadSlot | undefined;
  /** Chunk payload bytes of the tensor being received, not yet in a spool file. */
  pendingBytes = 0;
  /** True once the tensor files were deleted (the job merged): `held` lists what they were. */
  discarded = false;
  private plan = new Map<string, number>();

  constructor(
    /** The party's spool folder. */
    readonly dir: string,
  ) {}

  /** Bytes of the party's spool files. */
  get heldBytes(): number {
    let n = 0;
    for (const t of this.held.values()) n += t.bytes;
    return n;
  }

  /** Bytes of the party's spool files still on disk. */
  get diskBytes(): number {
    return this.discarded ? 0 : this.heldBytes;
  }

  /** Tensors the party must send: those planned as sent; 0 before a header. */
  get expected(): number {
    return this.plan.size;
  }

  /** True once a header arrived and every tensor it plans as sent is held. */
  get complete(): boolean {
    return this.header !== undefined && this.held.size === this.plan.size;
  }

  /** Index in the header of a tensor planned as sent, or undefined. */
  planIndex(name: string): number | undefined {
    return this.plan.get(name);
  }

  /** Sets the header in memory (after it was stored or read back). */
  private useHeader(header: DeltaHeader): void {
    this.header = header;
    this.plan = new Map();
    header.tensors.forEach((t, i) => {
      if (t.sent) this.plan.set(t.name, i);
    });
  }

  /** Stores a newly accepted header. The caller has checked that no tensor of another header is held. */
  async saveHeader(header: DeltaHeader): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    await writeFileDurably(join(this.dir, HEADER_FILE), `${JSON.stringify(DeltaHeader.toJSON(header))}\n`);
    this.useHeader(header);
  }

  /**
   * Starts the spool file of a planned tensor; write its begin, chunks and
   * end, then {@link PartySpool.commit} or `abort()` the writer.
   */
  async startTensor(plan: TensorPlan, index: number): Promise<DeltaFileWriter> {
    const h = this.header!;
    await mkdir(this.dir, { recursive: true });
    const writer = await DeltaFileWriter.create(join(this.dir, `${index}.dppa`));
    try {
      await writer.write({
        header: { ...h, options: {}, tensors: [plan], producer: 'dppa-federated server spool' },
      });
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return writer;
  }

  /** Closes a tensor's spool file (fsync, rename into place) and counts it as held. */
  async commit(name: string, index: number, writer: DeltaFileWriter): Promise<HeldTensor> {
    await writer.close();
    const held: HeldTensor = { name, index, bytes: (await stat(writer.path)).size, file: writer.path };
    this.held.set(name, held);
    return held;
  }

  /**
   * Deletes the tensor files once the job has merged, after recording in
   * `discarded.json` what they were (so that `held` reads the same after a
   * restart). The header stays. With a shared folder, read it again first
   * ({@link PartySpool.refresh}): `held` must list what every replica received.
   * With a shared folder another replica may be deleting them at the same
   * moment (its `discarded.json` is written first): what it has not deleted
   * yet is deleted here too, so that no tensor file is left when this returns.
   * @returns True if this call recorded the deletion; false when the spool
   *   was discarded already (or is being discarded elsewhere), or is incomplete.
   */
  async discard(): Promise<boolean> {
    if (!this.discarded && !this.complete) {
      const names = await filesIn(this.dir);
      if (!names.includes(DISCARDED_FILE)) return false;
      await this.readDiscarded(names, false);
    }
    if (this.discarded) {
      await this.removeTensorFiles(await filesIn(this.dir));
      return false;
    }
    const held = [...this.held.values()].map(({ name, index, bytes }) => ({ name, index, bytes }));
    await writeFileDurably(join(this.dir, DISCARDED_FILE), `${JSON.stringify(held)}\n`);
    await this.removeTensorFiles(await filesIn(this.dir));
    this.discarded = true;
    return true;
  }

  /**
   * Deletes tensors found unusable after they were accepted (a damaged spool
   * file): they are no longer held, so the party's upload is incomplete and
   * a push sends them again.
   */
  async drop(names: readonly string[]): Promise<void> {
    for (const name of names) {
      const t = this.held.get(name);
      if (t === undefined) continue;
      await rm(t.file, { force: true });
      this.held.delete(name);
    }
  }

  /**
   * Reads back what a previous run left: the header and every complete tensor
   * file; temporary files (tensors cut off mid-way) and files that do not fit
   * the header are deleted.
   */
  async recover(log: Logger, shared = false): Promise<void> {
    const names = await filesIn(this.dir);
    await removeTemps(this.dir, names, shared);
    await this.readBack(names, log);
  }

  /**
   * Reads again what other replicas added to a shared folder: the header and
   * complete tensors not yet known here. Never deletes anything.
   */
  async refresh(log: Logger): Promise<void> {
    const names = await filesIn(this.dir);
    await this.readBack(
      names.filter((n) => !n.includes(TEMP_MARK)),
      log,
      false,
    );
  }

  private async readBack(names: string[], log: Logger, prune = true): Promise<void> {
    if (names.includes(HEADER_FILE) && (prune || this.header === undefined)) {
      this.useHeader(DeltaHeader.fromJSON(JSON.parse(await readFile(join(this.dir, HEADER_FILE), 'utf8'))));
    }
    if (names.includes(DISCARDED_FILE)) {
      await this.readDiscarded(names, prune);
      return;
    }
    const found: { index: number; file: string }[] = [];
    for (const name of names) {
      const m = TENSOR_FILE.exec(name);
      if (m !== null) found.push({ index: Number(m[1]), file: join(this.dir, name) });
    }
    if (!prune) {
      // Dropped on another replica (drop()): no longer held.
      const present = new Set(found.map((f) => f.file));
      for (const [name, t] of this.held) if (!present.has(t.file)) this.held.delete(name);
    }
    for (const { index, file } of found.sort((a, b) => a.index - b.index)) {
      const plan = this.header?.tensors[index];
      if (plan === undefined || !plan.sent) {
        if (!prune) continue;
        log.warn('deleting a spooled tensor that the stored header does not plan', { file });
        await rm(file, { force: true });
        continue;
      }
      if (this.held.has(plan.name)) continue;
      const bytes = await sizeOf(file);
      // Gone since the folder was listed: another replica deleted the job's uploads (its discarded.json tells, next time).
      if (bytes !== undefined) this.held.set(plan.name, { name: plan.name, index, bytes, file });
    }
  }

  /** A discarded spool: `held` from `discarded.json`; tensor files a deletion cut short are deleted (when `prune`). */
  private async readDiscarded(names: string[], prune: boolean): Promise<void> {
    const list = JSON.parse(await readFile(join(this.dir, DISCARDED_FILE), 'utf8')) as {
      name: string;
      index: number;
      bytes: number;
    }[];
    this.held.clear();
    for (const { name, index, bytes } of list)
      this.held.set(name, { name, index, bytes, file: join(this.dir, `${index}.dppa`) });
    this.discarded = true;
    if (prune) await this.removeTensorFiles(names);
  }

  /** Deletes the tensor files among `names` (files of this folder). */
  private async removeTensorFiles(names: string[]): Promise<void> {
    for (const name of names.filter((n) => TENSOR_FILE.test(n))) await rm(join(this.dir, name), { force: true });
  }
}

/** Options of {@link Spool.open}. */
export interface SpoolOptions {
  store: JobStore;
  log: Logger;
  /** The data folder is shared by replicas (`--cluster`). @default false */
  shared?: boolean;
  /** {@link Spool.discardJob} keeps the files (`--keep-uploads`). @default false */
  keepUploads?: boolean;
}

/** The spools of every party of every job. */
export class Spool {
  private readonly parties = new Map<string, PartySpool>();

  private constructor(
    private readonly store: JobStore,
    private readonly log: Logger,
    private readonly shared: boolean,
    private readonly keepUploads: boolean,
  ) {}

  /** Recovers the spool of every job in the store. */
  static async open(opts: SpoolOptions): Promise<Spool> {
    const spool = new Spool(opts.store, opts.log, opts.shared ?? false, opts.keepUploads ?? false);
    await pMap(
      opts.store.list(),
      async (job) => {
        spool.addJob(job);
        for (const p of job.parties) await spool.party(job.id, p.name).recover(opts.log, spool.shared);
        // Temporary files of `secure/` (its discard mark, the union) a crash left.
        if (job.secure !== undefined) {
          const dir = secureDir(opts.store.dir(job.id));
          await removeTemps(dir, await filesIn(dir), spool.shared);
        }
        // A server stopped between a merge and the deletion of its uploads deletes them now.
        if (job.state === JobState.JOB_STATE_MERGED) await spool.discardJob(job.id);
        else if (job.state === JobState.JOB_STATE_FAILED) await spool.discardSecure(job.id);
      },
      { concurrency: LOAD_CONCURRENCY },
    );
    return spool;
  }

  /**
   * The spools of a job's parties as the folder holds them now: with a shared
   * folder they are read again first (what other replicas received);
   * otherwise this process received everything and they are current.
   */
  async ofJob(jobId: string): Promise<ReadonlyMap<string, PartySpool>> {
    const spools = new Map<string, PartySpool>();
    for (const p of this.store.get(jobId).parties) spools.set(p.name, await this.ofParty(jobId, p.name));
    return spools;
  }

  /** One party's spool as the folder holds it now (see {@link ofJob}); the party must belong to the job. */
  async ofParty(jobId: string, party: string): Promise<PartySpool> {
    const s = this.party(jobId, party);
    if (this.shared) await s.refresh(this.log);
    return s;
  }

  /** Registers the (empty) spools of a new job's parties. */
  addJob(job: StoredJob): void {
    for (const p of job.parties) {
      if (!this.parties.has(key(job.id, p.name)))
        this.parties.set(key(job.id, p.name), new PartySpool(join(this.store.dir(job.id), 'uploads', p.name)));
    }
  }

  /** The spool of one party as last read (see {@link ofParty}); the party must belong to the job. */
  party(jobId: string, party: string): PartySpool {
    // With replicas, a job created on another one is first met here.
    if (this.shared && !this.parties.has(key(jobId, party))) {
      const job = this.store.list().find((j) => j.id === jobId);
      if (job !== undefined) this.addJob(job);
    }
    const s = this.parties.get(key(jobId, party));
    if (s === undefined) throw new Error(`no spool for party ${party} of job ${jobId}`);
    return s;
  }

  /**
   * Deletes the tensor files of every party of a merged job ({@link PartySpool.discard}),
   * unless the server keeps uploads. A failure is logged, not thrown: the job
   * has merged whatever becomes of its uploads.
   */
  async discardJob(jobId: string): Promise<void> {
    await this.discardSecure(jobId);
    if (this.keepUploads) return;
    let spools: PartySpool[];
    try {
      spools = [...(await this.ofJob(jobId)).values()];
    } catch (err) {
      this.log.warn('could not read the uploads of a merged job again; they are kept', { jobId, err });
      return;
    }
    let bytes = 0;
    let deleted = 0;
    for (const s of spools) {
      try {
        const before = s.diskBytes;
        if (!(await s.discard())) continue;
        bytes += before;
        deleted++;
      } catch (err) {
        this.log.warn('could not delete the uploads of a merged job', { jobId, dir: s.dir, err });
      }
    }
    if (deleted > 0) this.log.info('uploads of a merged job deleted', { jobId, parties: deleted, bytes });
  }

  /**
   * Deletes a secure job's masked vectors and unmasked sum (server/secure/secure-sum.ts) once it merged or failed,
   * `--keep-uploads` or not: nothing derived from a party's values stays on disk. Logged, not thrown.
   */
  async discardSecure(jobId: string): Promise<void> {
    const job = this.store.list().find((j) => j.id === jobId);
    if (job?.secure === undefined) return;
    try {
      if (await discardSecureData(this.store.dir(jobId)))
        this.log.info('masked vectors, unmasked sum and union of a secure job deleted', { jobId });
    } catch (err) {
      this.log.warn('could not delete the masked vectors, unmasked sum and union of a secure job', { jobId, err });
    }
  }

  /** Bytes on disk over all spools, with tensors being received. */
  totalBytes(): number {
    let n = 0;
    for (const s of this.parties.values()) n += s.diskBytes + s.pendingBytes;
    return n;
  }
}

/**
 * Deletes the temporary files among `names` in `dir` (left by a crash mid-write); with a shared folder only those
 * untouched for {@link STALE_TEMP_MS}, since another replica may be writing one right now.
 */
async function removeTemps(dir: string, names: string[], shared: boolean): Promise<void> {
  for (const name of names.filter((n) => n.includes(TEMP_MARK))) {
    if (shared && Date.now() - (await stat(join(dir, name)).catch(() => ({ mtimeMs: 0 }))).mtimeMs < STALE_TEMP_MS)
      continue;
    await rm(join(dir, name), { force: true });
  }
}

/** Names in a folder; none when it does not exist (a party that has sent nothing). */
async function filesIn(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

function key(jobId: string, party: string): string {
  return `${jobId}/${party}`;
}
