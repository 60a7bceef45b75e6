/**
 * The merge records in the jobs bucket (`merge.<jobId>`), shared by the
 * replicas: every bit is set against the revision read, so concurrent tensor
 * tasks never lose one another's.
 */
import type { KV } from '@nats-io/kv';
import {
  countWritten,
  emptyRecord,
  isSet,
  bitmap,
  withBit,
  type MergeRecord,
  type MergeRecords,
} from '../backend/tasks.js';
import { mergeKey } from '../nats/subjects.js';
import { isRevisionConflict, MAX_CONFLICT_RETRIES, natsCall } from './nats-calls.js';

/** Merge records in the KV bucket. */
export class KvMergeRecords implements MergeRecords {
  constructor(private readonly kv: KV) {}

  async get(jobId: string): Promise<MergeRecord | undefined> {
    const entry = await natsCall('reading a merge record', () => this.kv.get(mergeKey(jobId)));
    return entry?.operation === 'PUT' ? entry.json<MergeRecord>() : undefined;
  }

  async create(jobId: string, tensorsTotal: number): Promise<MergeRecord> {
    for (let attempt = 1; ; attempt++) {
      const found = await this.get(jobId);
      if (found !== undefined) return found;
      const record = emptyRecord(tensorsTotal);
      try {
        await natsCall('creating a merge record', () => this.kv.create(mergeKey(jobId), JSON.stringify(record)));
        return record;
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  async markWritten(jobId: string, index: number): Promise<number> {
    const key = mergeKey(jobId);
    for (let attempt = 1; ; attempt++) {
      const entry = await natsCall('reading a merge record', () => this.kv.get(key));
      if (entry?.operation !== 'PUT') throw new Error(`job ${jobId} has no merge record`);
      const record = entry.json<MergeRecord>();
      if (isSet(bitmap(record), index)) return countWritten(record);
      const updated = withBit(record, index);
      try {
        await natsCall('updating a merge record', () => this.kv.update(key, JSON.stringify(updated), entry.revision));
        return countWritten(updated);
      } catch (err) {
        if (!isRevisionConflict(err) || attempt >= MAX_CONFLICT_RETRIES) throw err;
      }
    }
  }

  /** The queued tasks carry the merge on: the record stays. */
  endRun(): Promise<undefined> {
    return Promise.resolve(undefined);
  }
}
