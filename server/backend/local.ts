/**
 * The local backend: one server and its data folder. Jobs in `job.json`,
 * events in `events.jsonl` (published to NATS too with `--nats`), the factor
 * searches and the merge's tasks run in this process.
 */
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import pMap from 'p-map';
import type { NatsOptions } from '../config.js';
import { SearchDriver } from '../dpa/search-driver.js';
import { FileJobEvents } from '../jobs/job-events.js';
import { LOAD_CONCURRENCY, LocalJobStore } from '../jobs/job-store.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { PATCH_FILE_NAME } from '../../proto/patch/index.js';
import { MergeDriver } from '../merge/merge-driver.js';
import { NatsEventPublisher } from '../nats/event-publisher.js';
import type { Backend, JobSteps, StepDeps } from './backend.js';
import { InProcessTasks, MemoryMergeRecords } from './in-process.js';

/** Options of {@link LocalBackend.open}. */
export interface LocalBackendOptions {
  dataDir: string;
  log: Logger;
}

/** Jobs, events and work of one server, in its data folder. */
export class LocalBackend implements Backend {
  readonly sharedFolder = false;
  readonly remoteEvaluators = true;
  readonly sweepMs = undefined;
  private publisher: NatsEventPublisher | undefined;

  private constructor(
    readonly store: LocalJobStore,
    readonly events: FileJobEvents,
  ) {}

  /** Reads the jobs and their event logs back; removes what a crash left of a merge. */
  static async open(opts: LocalBackendOptions): Promise<LocalBackend> {
    const store = await LocalJobStore.open(opts.dataDir, opts.log);
    const events = new FileJobEvents(opts.log);
    try {
      await pMap(
        store.list(),
        async (job) => {
          await removeStaleOutputs(store.dir(job.id));
          await events.load(job.id, store.dir(job.id));
        },
        { concurrency: LOAD_CONCURRENCY },
      );
    } catch (err) {
      await events.close();
      throw err;
    }
    return new LocalBackend(store, events);
  }

  /**
   * Publishes every event to NATS as well (`--nats` without `--cluster`), what
   * a previous run left unpublished first; until {@link close}.
   * @throws NatsUnavailableError naming the URL if NATS cannot be reached.
   */
  async publishEvents(nats: NatsOptions, metrics: Metrics, log: Logger): Promise<void> {
    const { store } = this;
    this.publisher = await NatsEventPublisher.start({
      ...nats,
      events: this.events,
      jobIds: store.list().map((j) => j.id),
      jobDir: (id) => store.dir(id),
      registry: metrics.registry,
      log,
    });
  }

  steps(deps: StepDeps): JobSteps {
    const all = { store: this.store, events: this.events, ...deps };
    const mergeTasks: InProcessTasks = new InProcessTasks(
      MergeDriver.lanes(deps.mergeWorkers),
      () => (task, signal) => merge.execute(task, signal),
      deps.policy,
      deps.log,
    );
    const merge: MergeDriver = new MergeDriver({ ...all, records: new MemoryMergeRecords(), tasks: () => mergeTasks });
    // Every party's search at once.
    const searchTasks: InProcessTasks = new InProcessTasks(
      Infinity,
      () => (task, signal) => search.execute(task, signal),
      deps.policy,
      deps.log,
    );
    const search: SearchDriver = new SearchDriver({ ...all, tasks: () => searchTasks, merge });
    return {
      search,
      merge,
      queued: false,
      start: () => undefined,
      close: () => merge.close(),
    };
  }

  /** Nothing of this backend passes by itself: its steps run here, on its own folder. */
  transient(): boolean {
    return false;
  }

  /** Publishes what is pending (for up to `flushMs`), then closes the event logs. */
  async close(opts: { flushMs?: number } = {}): Promise<void> {
    await this.publisher?.stop({ flushMs: opts.flushMs ?? 0 });
    await this.events.close();
  }
}

/**
 * Removes temporary merge outputs a crash or a stop left behind (`merged.tmp-*`, `merged.old-*`,
 * `merged-patch.dppa.tmp-*`, a joined pieces folder `*.patch.joined`).
 */
async function removeStaleOutputs(jobDir: string): Promise<void> {
  for (const name of await readdir(jobDir)) {
    if (
      name.startsWith('merged.tmp-') ||
      name.startsWith('merged.old-') ||
      name.startsWith(`${PATCH_FILE_NAME}.tmp-`) ||
      name.endsWith('.patch.joined')
    )
      await rm(join(jobDir, name), { recursive: true, force: true });
  }
}
