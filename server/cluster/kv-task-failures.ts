/**
 * How many times each queued task failed, in the jobs bucket (`failures.<jobId>.<kind>[.<tensor>|.<party>]`),
 * shared by the replicas: what `--task-attempts` counts, rather than JetStream's delivery count (which also
 * counts tasks handed back as not ready, a paused job's deliveries and lost acknowledgements).
 */
import type { KV } from '@nats-io/kv';
import type { Task } from '../backend/tasks.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';

/** KV key of a task's failure count (a party's name may hold characters a key may not: base64url). */
export function taskFailuresKey(task: Task): string {
  const which =
    task.tensor !== undefined
      ? `.${task.tensor.index}`
      : task.party !== undefined
        ? `.${Buffer.from(task.party).toString('base64url')}`
        : '';
  return `failures.${task.jobId}.${task.kind}${which}`;
}

/** The failure counts of the cluster's tasks. */
export class KvTaskFailures {
  constructor(private readonly kv: KV) {}

  /**
   * Counts one more failure of the task.
   * @returns Its failures so far, this one included.
   * @throws NatsUnavailableError while NATS is away.
   */
  async add(task: Task): Promise<number> {
    const key = taskFailuresKey(task);
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading a task failure count', () => this.kv.get(key));
      const n = (entry?.operation === 'PUT' ? Number(entry.string()) || 0 : 0) + 1;
      try {
        await natsCall('counting a task failure', () =>
          entry === null ? this.kv.create(key, String(n)) : this.kv.update(key, String(n), entry.revision),
        );
        return n;
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** Forgets the task's count (it succeeded or is done with). @throws NatsUnavailableError while NATS is away. */
  async clear(task: Task): Promise<void> {
    await natsCall('removing a task failure count', () => this.kv.purge(taskFailuresKey(task)));
  }
}
