/**
 * Follows one job's events on NATS JetStream until it merges (exit 0) or fails (exit 1); the server must run with
 * `dppa serve --nats URL`. See docs/design/examples.md.
 *
 *   npx tsx docs/examples/nats-wait-merged.ts nats://127.0.0.1:4222 JOB_ID
 */
import { jetstream } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';

/** The fields of a `JobEvent` payload this example reads (docs/events.md has them all). */
interface EventPayload {
  jobId: string;
  /** uint64, as a decimal string. */
  seq: string;
  time: string;
  merged?: { files?: string[]; seconds?: number };
  failed?: { reason?: string };
}

const [url, jobId] = process.argv.slice(2);
if (url === undefined || jobId === undefined) {
  console.error('usage: npx tsx docs/examples/nats-wait-merged.ts NATS_URL JOB_ID');
  process.exit(2);
}

const nc = await connect({ servers: url });
let code = 1;
try {
  // An ordered consumer: created by the client, replays the job's events from the first one, then follows new ones,
  // and goes away with the connection. A pipeline that must survive its own restarts uses a durable consumer instead.
  const consumer = await jetstream(nc).consumers.get('DPPA_EVENTS', { filter_subjects: `dppa.jobs.${jobId}.>` });
  const messages = await consumer.consume({ max_messages: 64 });
  for await (const m of messages) {
    const kind = m.subject.split('.').at(-1);
    const event = m.json<EventPayload>();
    console.log(`${event.seq} ${event.time} ${kind}`);
    if (kind === 'merged') {
      console.log(`merged in ${event.merged?.seconds ?? 0} s: ${(event.merged?.files ?? []).join(', ')}`);
      code = 0;
      break;
    }
    if (kind === 'failed') {
      console.log(`failed: ${event.failed?.reason ?? ''}`);
      break;
    }
  }
} finally {
  await nc.drain();
}
process.exitCode = code;
