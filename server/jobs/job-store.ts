/**
 * Where jobs are kept: the {@link JobStore} interface and its embedded implementation, {@link LocalJobStore}, one
 * atomically rewritten `jobs/<id>/job.json` per job. See docs/design/jobs.md.
 */
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import pMap from 'p-map';
import { parsePruneMethod, type PruneMethod } from '../../proto/algorithm/index.js';
import {
  DpaConfig,
  Evaluation,
  JobState,
  jobStateFromJSON,
  jobStateToJSON,
  MergeOptions,
} from '../../proto/gen/dppa/v1/jobs.js';
import { NotFoundError } from '../errors.js';
import { DEFAULT_MAX_ABS_VALUE } from './job-spec.js';
import { EVENTS_FILE } from './job-events.js';
import { TEMP_MARK, writeFileDurably } from '../durable-write.js';
import type { Logger } from '../log.js';
import type { SecureRecord } from '../secure/secure-record.js';

/**
 * Jobs read at once when a server starts. Each job costs a few small file
 * operations; one after the other, their round trips through libuv's threads
 * made 400 jobs take seconds (docs/server.md, "Start-up").
 */
export const LOAD_CONCURRENCY = 16;

/** Version of the `job.json` layout; bump when a field changes meaning. */
const STORE_VERSION = 1;

/** A party of a job as stored: its token only as a hash. */
export interface StoredParty {
  /** Party name, as given at creation. */
  name: string;
  /** Lower-case hex SHA-256 of the party's bearer token. */
  tokenSha256: string;
  /** True once the party has opened an upload (its `party_joined` event was sent). */
  joined: boolean;
  /** Set once the party's DPA factor search has finished: the factors the merge uses. */
  chosen?: ChosenFactors;
  /** Set while the job waits for this party to act again (jobs/party-stops.ts): why its work stopped. */
  stoppedReason?: string;
  /** True while the party's factor search is stopped (its evaluations failed): it resumes when the party rejoins. */
  searchStopped?: boolean;
}

/** The outcome of a party's factor search. */
export interface ChosenFactors {
  /** One factor per partition, partition 1 first. */
  factors: number[];
  /** Domain-Ratio of these factors, as a fraction. */
  domainRatio: number;
}

/** One file of a merged checkpoint. */
export interface MergedFileInfo {
  /** Bare file name inside the merged folder. */
  path: string;
  size: number;
  /** Lower-case hex SHA-256 of the whole file. */
  sha256: string;
}

/** Everything the server keeps about a job except upload progress. */
export interface StoredJob {
  id: string;
  label: string;
  state: JobState;
  /** Absolute path of the base checkpoint. */
  basePath: string;
  baseFingerprint: string;
  /** Bytes of tensor data in the base checkpoint. */
  baseBytes: number;
  rate: number;
  method: PruneMethod;
  dpa: DpaConfig;
  merge: MergeOptions;
  parties: StoredParty[];
  /** Every evaluation of the DPA search, in the order they were recorded (parties interleaved). */
  evaluations: Evaluation[];
  /** Upload cap per party, fixed at creation. */
  maxUploadBytes: number;
  /** Largest magnitude of an uploaded delta value, fixed at creation. */
  maxAbsValue: number;
  failureReason: string;
  /** RFC 3339. */
  createdAt: string;
  /** RFC 3339. */
  updatedAt: string;
  /** Set once MERGED. */
  merged: { files: MergedFileInfo[]; seconds: number; patch?: MergedFileInfo } | undefined;
  /** Set for a PRIVACY_SECURE job: its parameters, phase and aggregator state (server/secure/). */
  secure?: SecureRecord;
}

/** What `job.json` contains. */
interface JobFile extends Omit<StoredJob, 'state' | 'dpa' | 'merge' | 'evaluations' | 'maxAbsValue'> {
  version: number;
  /** Absent in files written before uploaded values were bounded: those jobs take the default. */
  maxAbsValue?: number;
  state: string;
  dpa: unknown;
  merge: unknown;
  /** Absent in files written before the factor search existed. */
  evaluations?: unknown[];
}

/** A job as the JSON object `job.json` (or a KV entry) holds. */
export function encodeJob(job: StoredJob): string {
  return `${JSON.stringify(toFile(job), null, 2)}\n`;
}

/**
 * Reads a job back from {@link encodeJob}'s text.
 * @param where - Names the file or key in errors.
 * @throws Error if the text is not a job of this layout version.
 */
export function decodeJob(text: string, where: string): StoredJob {
  return fromFile(JSON.parse(text) as JobFile, where);
}

function toFile(job: StoredJob): JobFile {
  return {
    version: STORE_VERSION,
    ...job,
    state: jobStateToJSON(job.state),
    dpa: DpaConfig.toJSON(job.dpa),
    merge: MergeOptions.toJSON(job.merge),
    evaluations: job.evaluations.map((e) => Evaluation.toJSON(e)),
  };
}

function fromFile(file: JobFile, path: string): StoredJob {
  if (file.version !== STORE_VERSION)
    throw new Error(`${path}: job file version ${file.version}, this server reads ${STORE_VERSION}`);
  const rest: Partial<Pick<JobFile, 'version'>> & Omit<JobFile, 'version'> = { ...file };
  delete rest.version;
  return {
    ...rest,
    state: jobStateFromJSON(file.state),
    method: parsePruneMethod(file.method, `${path}: method`),
    dpa: DpaConfig.fromJSON(file.dpa),
    merge: MergeOptions.fromJSON(file.merge),
    evaluations: (file.evaluations ?? []).map((e) => Evaluation.fromJSON(e)),
    maxAbsValue: file.maxAbsValue ?? DEFAULT_MAX_ABS_VALUE,
  };
}

/** True for states no job leaves. */
export function isTerminal(state: JobState): boolean {
  return state === JobState.JOB_STATE_MERGED || state === JobState.JOB_STATE_FAILED;
}

/**
 * The jobs the server knows. Reads are synchronous (from memory); changes
 * are written through before they resolve.
 */
export interface JobStore {
  /** Folder of a job's files (uploads, merged checkpoint) in the data folder. */
  dir(id: string): string;
  /**
   * The job with this id.
   * @throws NotFoundError if there is none.
   */
  get(id: string): StoredJob;
  /** Every job, newest first. */
  list(): StoredJob[];
  /** Number of jobs per state name (`COLLECTING`, …), every state present. */
  countByState(): Record<string, number>;
  /** Stores a new job. */
  create(job: StoredJob): Promise<StoredJob>;
  /**
   * Changes a job and writes it out; `updatedAt` is set. `change` may run
   * more than once (a store shared by replicas retries on a concurrent
   * change, with the job as it then is), so it must only mutate its argument
   * and may throw to give up.
   * @throws NotFoundError if there is no such job; what `change` throws; Error from the storage.
   */
  update(id: string, change: (job: StoredJob) => void): Promise<StoredJob>;
  /**
   * Stores whose copy in memory may lag the truth (the cluster's KV bucket):
   * the job as stored now, the copy updated. Absent when `get` is the truth.
   */
  fresh?(id: string): Promise<StoredJob>;
}

/**
 * What both stores share: the jobs in memory, answering every read, and the
 * job folders under `<data>/jobs`. Subclasses say how changes are stored.
 */
export abstract class MemoryJobStore implements JobStore {
  /** The jobs, by id; the objects callers hold stay current. */
  protected readonly jobs = new Map<string, StoredJob>();

  protected constructor(
    /** `<data>/jobs`. */
    readonly root: string,
  ) {}

  /** Folder of a job's files. */
  dir(id: string): string {
    return join(this.root, id);
  }

  /**
   * The job with this id.
   * @throws NotFoundError if there is none.
   */
  get(id: string): StoredJob {
    const job = this.jobs.get(id);
    if (job === undefined) throw new NotFoundError(`no job ${JSON.stringify(id)}`);
    return job;
  }

  /** Every job, newest first (ties by id). */
  list(): StoredJob[] {
    return [...this.jobs.values()].sort((a, b) =>
      a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : a.id < b.id ? 1 : -1,
    );
  }

  /** Number of jobs per state name (`COLLECTING`, …), every state present. */
  countByState(): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const s of [
      JobState.JOB_STATE_COLLECTING,
      JobState.JOB_STATE_DPA,
      JobState.JOB_STATE_MERGING,
      JobState.JOB_STATE_MERGED,
      JobState.JOB_STATE_FAILED,
    ]) {
      counts[stateName(s)] = 0;
    }
    for (const job of this.jobs.values()) counts[stateName(job.state)] = (counts[stateName(job.state)] ?? 0) + 1;
    return counts;
  }

  abstract create(job: StoredJob): Promise<StoredJob>;
  abstract update(id: string, change: (job: StoredJob) => void): Promise<StoredJob>;

  /**
   * Shows a new version of a job held in memory: the object callers hold takes its fields, and loses those it no
   * longer has (an optional field removed).
   * @returns The object held.
   */
  protected show(held: StoredJob, next: StoredJob): StoredJob {
    for (const k of Object.keys(held) as (keyof StoredJob)[]) if (!(k in next)) delete held[k];
    return Object.assign(held, next);
  }
}

/** The jobs of one data folder (the embedded default). */
export class LocalJobStore extends MemoryJobStore {
  /** Per job, the last update; the next one starts after it, so that each change sees the one before written. */
  private readonly updates = new Map<string, Promise<unknown>>();

  /**
   * Loads every job of `<dataDir>/jobs`, removing temporary files a crash left.
   * A folder holding no more than a job creation that did not finish leaves
   * (an event log, a temporary `job.json`) is removed with a warning. A job
   * folder whose `job.json` cannot be read is skipped with an error logged, so
   * that one damaged job does not keep the server down.
   */
  static async open(dataDir: string, log: Logger): Promise<LocalJobStore> {
    const store = new LocalJobStore(join(dataDir, 'jobs'));
    await mkdir(store.root, { recursive: true });
    const folders = (await readdir(store.root, { withFileTypes: true }))
      .filter((e) => e.isDirectory())
      .map((e) => join(store.root, e.name));
    const loaded = await pMap(
      folders,
      async (dir) => {
        for (const name of await readdir(dir)) {
          if (name.startsWith(`job.json${TEMP_MARK}`)) await rm(join(dir, name), { force: true });
        }
        const names = await readdir(dir);
        if (!names.includes('job.json') && names.every((n) => n === EVENTS_FILE)) {
          log.warn('removing the folder of a job whose creation did not finish', { dir });
          await rm(dir, { recursive: true, force: true });
          return undefined;
        }
        const path = join(dir, 'job.json');
        try {
          return decodeJob(await readFile(path, 'utf8'), path);
        } catch (err) {
          log.error('skipping a job whose job.json cannot be read', { path, err });
          return undefined;
        }
      },
      { concurrency: LOAD_CONCURRENCY },
    );
    for (const job of loaded) if (job !== undefined) store.jobs.set(job.id, job);
    return store;
  }

  /** Writes the job's `job.json` (its folder is created if need be); the job exists once that is written. */
  async create(job: StoredJob): Promise<StoredJob> {
    await mkdir(this.dir(job.id), { recursive: true });
    await writeFileDurably(join(this.dir(job.id), 'job.json'), encodeJob(job));
    this.jobs.set(job.id, job);
    return job;
  }

  /**
   * Changes a job and writes it out; `updatedAt` is set. The change is made on a copy, written durably, and only
   * then shown to readers (the object callers hold takes the copy's fields): nobody is told of a state a crash
   * would lose, and a change that throws or a write that fails leaves the job as it was.
   * @param change - Mutates the copy in place.
   * @throws NotFoundError if there is no such job; what `change` throws; Error from the file system.
   */
  async update(id: string, change: (job: StoredJob) => void): Promise<StoredJob> {
    this.get(id);
    const run = (this.updates.get(id) ?? Promise.resolve()).then(async () => {
      const held = this.get(id);
      const path = join(this.dir(id), 'job.json');
      const next = decodeJob(encodeJob(held), path);
      change(next);
      next.updatedAt = new Date().toISOString();
      await writeFileDurably(path, encodeJob(next));
      return this.show(held, next);
    });
    const settled = run.catch(() => undefined);
    this.updates.set(id, settled);
    void settled.then(() => {
      if (this.updates.get(id) === settled) this.updates.delete(id);
    });
    return await run;
  }
}

/** `COLLECTING`, `MERGED`, …: the state without its enum prefix, for messages and metric labels. */
export function stateName(state: JobState): string {
  return jobStateToJSON(state).replace(/^JOB_STATE_/, '');
}
