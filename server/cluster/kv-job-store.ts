/**
 * Jobs in a JetStream KV bucket ({@link JOBS_BUCKET}), shared by every
 * replica: any replica serves any call for any job.
 *
 * Reads come from a copy in memory that a watch on the bucket keeps current
 * (a change made on another replica shows up within milliseconds), so they
 * stay synchronous as with the local store. Every change reads the job from
 * the bucket, applies the change and writes it back against the revision it
 * read; when another replica wrote in between, it starts again from the new
 * value. Job folders (uploads, merged checkpoints) live in the shared data
 * folder.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { KV } from '@nats-io/kv';
import { KvWatchInclude } from '@nats-io/kv';
import { NotFoundError } from '../errors.js';
import { decodeJob, encodeJob, MemoryJobStore, type StoredJob } from '../jobs/job-store.js';
import type { Logger } from '../log.js';
import { JOB_KEYS, JOBS_BUCKET, jobKey } from '../nats/subjects.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';

/** Options of {@link KvJobStore.open}. */
export interface KvJobStoreOptions {
  /** The bucket ({@link JOBS_BUCKET}). */
  kv: KV;
  /** The shared data folder; job folders are `<dataDir>/jobs/<id>`. */
  dataDir: string;
  log: Logger;
}

/** The jobs of a cluster. `open()` it, then `close()` it. */
export class KvJobStore extends MemoryJobStore {
  /** Bucket revision of each job in memory: an older value never replaces a newer one. */
  private readonly revisions = new Map<string, number>();
  private stopWatch: (() => void) | undefined;
  private watching: Promise<void> = Promise.resolve();

  private constructor(private readonly opts: KvJobStoreOptions) {
    super(join(opts.dataDir, 'jobs'));
  }

  /**
   * Watches the bucket, then loads every job in it.
   * @throws NatsUnavailableError if the bucket cannot be read.
   */
  static async open(opts: KvJobStoreOptions): Promise<KvJobStore> {
    const store = new KvJobStore(opts);
    await mkdir(store.root, { recursive: true });
    // Updates first, then the snapshot: nothing written in between is missed, and revisions keep the newest.
    const updates = await natsCall('watching the jobs bucket', () => opts.kv.watch({ key: JOB_KEYS, include: KvWatchInclude.UpdatesOnly }));
    store.stopWatch = () => updates.stop();
    store.watching = (async () => {
      for await (const e of updates) {
        if (e.operation === 'PUT') store.take(e.string(), e.key, e.revision);
      }
    })().catch((err: unknown) => opts.log.error('the watch on the jobs bucket ended', { err }));
    const keys: string[] = [];
    for await (const k of await natsCall('listing jobs', () => opts.kv.keys(JOB_KEYS))) keys.push(k);
    for (const k of keys) {
      const e = await natsCall('reading a job', () => opts.kv.get(k));
      if (e?.operation === 'PUT') store.take(e.string(), k, e.revision);
    }
    return store;
  }

  /** Puts a job read from the bucket in memory unless a newer revision is there; keeps the object callers hold. */
  private take(text: string, key: string, revision: number): StoredJob | undefined {
    let job: StoredJob;
    try {
      job = decodeJob(text, `${JOBS_BUCKET}:${key}`);
    } catch (err) {
      this.opts.log.error('skipping a job that cannot be read from the bucket', { key, err });
      return undefined;
    }
    if ((this.revisions.get(job.id) ?? 0) >= revision) return this.jobs.get(job.id);
    this.revisions.set(job.id, revision);
    const held = this.jobs.get(job.id);
    if (held === undefined) {
      this.jobs.set(job.id, job);
      return job;
    }
    Object.assign(held, job);
    return held;
  }

  /** @throws NatsUnavailableError if NATS is away. */
  async create(job: StoredJob): Promise<StoredJob> {
    await mkdir(this.dir(job.id), { recursive: true });
    const revision = await natsCall('creating a job', () => this.opts.kv.create(jobKey(job.id), encodeJob(job)));
    return this.take(encodeJob(job), jobKey(job.id), revision) ?? job;
  }

  /** @throws NatsUnavailableError if NATS is away; NotFoundError; what `change` throws. */
  async update(id: string, change: (job: StoredJob) => void): Promise<StoredJob> {
    const key = jobKey(id);
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading a job', () => this.opts.kv.get(key));
      if (entry === null || entry.operation !== 'PUT') throw new NotFoundError(`no job ${JSON.stringify(id)}`);
      const job = decodeJob(entry.string(), `${JOBS_BUCKET}:${key}`);
      change(job);
      job.updatedAt = new Date().toISOString();
      const text = encodeJob(job);
      try {
        const revision = await natsCall('updating a job', () => this.opts.kv.update(key, text, entry.revision));
        return this.take(text, key, revision) ?? job;
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** Stops watching the bucket. */
  async close(): Promise<void> {
    this.stopWatch?.();
    await this.watching;
  }
}
