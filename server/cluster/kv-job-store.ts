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
import { setTimeout as sleep } from 'node:timers/promises';
import type { KV } from '@nats-io/kv';
import { KvWatchInclude } from '@nats-io/kv';
import { NotFoundError } from '../errors.js';
import { decodeJob, encodeJob, MemoryJobStore, type StoredJob } from '../jobs/job-store.js';
import type { Logger } from '../log.js';
import { JOB_KEYS, JOBS_BUCKET, jobKey } from '../nats/subjects.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';

/** How long a watch that ended waits before it starts again. */
const RECONNECT_WAIT_MS = 1000;

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
  private closed = false;
  /** Number of the current watch: only its end starts another. */
  private generation = 0;

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
    await store.watch();
    return store;
  }

  /**
   * Starts the watch on the bucket, then loads every job in it (updates
   * first, then the snapshot: nothing written in between is missed, and
   * revisions keep the newest). A watch that ends before close() is started
   * again, snapshot included, so the copy does not silently go stale.
   */
  private async watch(): Promise<void> {
    const { kv, log } = this.opts;
    const updates = await natsCall('watching the jobs bucket', () =>
      kv.watch({ key: JOB_KEYS, include: KvWatchInclude.UpdatesOnly }),
    );
    if (this.closed) {
      updates.stop();
      return;
    }
    const generation = ++this.generation;
    this.stopWatch = () => updates.stop();
    this.watching = (async () => {
      for await (const e of updates) {
        if (e.operation === 'PUT') this.take(e.string(), e.key, e.revision);
      }
    })().then(
      () => this.rewatch(generation, undefined),
      (err: unknown) => this.rewatch(generation, err),
    );
    try {
      const keys: string[] = [];
      for await (const k of await natsCall('listing jobs', () => kv.keys(JOB_KEYS))) keys.push(k);
      for (const k of keys) {
        const e = await natsCall('reading a job', () => kv.get(k));
        if (e?.operation === 'PUT') this.take(e.string(), k, e.revision);
      }
    } catch (err) {
      // No snapshot: this watch is given up (without starting another), the caller tries again.
      if (generation === this.generation) this.generation++;
      updates.stop();
      throw err;
    }
    log.debug('watching the jobs bucket', { jobs: this.jobs.size });
  }

  /** The watch ended: unless closing (or it was given up), starts it again (every second until NATS lets it). */
  private rewatch(generation: number, err: unknown): void {
    if (this.closed || generation !== this.generation) return;
    this.opts.log.error('the watch on the jobs bucket ended; starting it again', { err });
    void (async () => {
      while (!this.closed) {
        await sleep(RECONNECT_WAIT_MS);
        if (this.closed) return;
        try {
          await this.watch();
          this.opts.log.info('watching the jobs bucket again');
          return;
        } catch (e) {
          this.opts.log.warn('cannot watch the jobs bucket yet', { err: e });
        }
      }
    })();
  }

  /**
   * The job as the bucket holds it now (this replica's copy may lag by
   * milliseconds, or more if its watch was interrupted); the copy is updated.
   * @throws NatsUnavailableError if NATS is away; NotFoundError.
   */
  async fresh(id: string): Promise<StoredJob> {
    const key = jobKey(id);
    const entry = await natsCall('reading a job', () => this.opts.kv.get(key));
    if (entry === null || entry.operation !== 'PUT') throw new NotFoundError(`no job ${JSON.stringify(id)}`);
    return this.take(entry.string(), key, entry.revision) ?? decodeJob(entry.string(), `${JOBS_BUCKET}:${key}`);
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
    return this.show(held, job);
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
    this.closed = true;
    this.stopWatch?.();
    await this.watching;
  }
}
