/**
 * The job and party of the RPC being handled, for its log lines: the wrapper
 * (handler.ts) opens a record per call, and whoever learns who calls (the
 * token check in auth.ts) writes into it, without passing it down every call.
 */
import { AsyncLocalStorage } from 'node:async_hooks';

/** What a call's log lines say about it besides its method. Never a token. */
export interface CallFields {
  jobId?: string;
  party?: string;
}

const current = new AsyncLocalStorage<CallFields>();

/** Runs `fn` with `fields` as the current call's record. */
export function withCallFields<T>(fields: CallFields, fn: () => Promise<T>): Promise<T> {
  return current.run(fields, fn);
}

/** Adds to the current call's record what it lacks (the request's own job stays: the call is about it). Nothing outside a call. */
export function noteCall(fields: CallFields): void {
  const record = current.getStore();
  if (record === undefined) return;
  if (record.jobId === undefined && fields.jobId !== undefined) record.jobId = fields.jobId;
  if (record.party === undefined && fields.party !== undefined) record.party = fields.party;
}
