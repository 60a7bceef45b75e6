/**
 * The one way a JetStream stream the server needs comes to exist when it is
 * missing: the events stream (event-publisher.ts) and the cluster's task
 * stream (cluster/task-queue.ts).
 */
import {
  JetStreamApiCodes,
  JetStreamApiError,
  StorageType,
  type JetStreamManager,
  type StreamConfig,
  type StreamInfo,
} from '@nats-io/jetstream';

/**
 * The stream's info; or, when there is no such stream, creates it from
 * `config` (file storage and one replica unless it says otherwise).
 * @returns The info of the existing stream, or undefined when it was created.
 */
export async function streamInfoOrCreate(
  jsm: JetStreamManager,
  config: Partial<StreamConfig> & { name: string },
): Promise<StreamInfo | undefined> {
  try {
    return await jsm.streams.info(config.name);
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)) throw err;
  }
  await jsm.streams.add({ storage: StorageType.File, num_replicas: 1, ...config });
  return undefined;
}
