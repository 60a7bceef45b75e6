/**
 * Retrying: the backoff schedule (with the dice fixed), which failures are
 * retried, giving up, cancellable waits that leave nothing behind, the time
 * limit of a call, and the typed errors.
 */
import assert from 'node:assert/strict';
import { getEventListeners } from 'node:events';
import { describe, it } from 'node:test';
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { CallScope } from '../client/sdk/call.js';
import { DppaRpcError, isServiceError } from '../client/sdk/errors.js';
import {
  Backoff,
  backoffDelay,
  isTransient,
  retrying,
  sleep,
  type RetryNotice,
  type RetryOptions,
} from '../client/sdk/retry.js';

const opts: RetryOptions = { forMs: 60_000, attempts: 6, initialDelayMs: 100, maxDelayMs: 1000 };

function serviceError(code: status, details: string): ServiceError {
  return Object.assign(new Error(`${code} ${status[code]}: ${details}`), { code, details, metadata: new Metadata() });
}

describe('backoff', () => {
  it('doubles the ceiling after each failure up to the maximum, waiting in its upper half', () => {
    const ceilings = [1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, opts, () => 1));
    assert.deepEqual(ceilings, [100, 200, 400, 800, 1000, 1000]);
    const floors = [1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, opts, () => 0));
    assert.deepEqual(floors, [50, 100, 200, 400, 500, 500]);
    assert.equal(
      backoffDelay(3, opts, () => 0.5),
      300,
    );
  });

  it('retries transient failures on a fake clock, then gives up with the last error', async () => {
    const waits: number[] = [];
    let calls = 0;
    const unavailable = new DppaRpcError('GetJob', status.UNAVAILABLE, 'connection refused');
    await assert.rejects(
      retrying(
        () => {
          calls++;
          return Promise.reject(unavailable);
        },
        opts,
        { sleep: (ms) => (waits.push(ms), Promise.resolve()), random: () => 1 },
      ),
      (e) => e === unavailable,
    );
    assert.equal(calls, 6);
    assert.deepEqual(waits, [100, 200, 400, 800, 1000]);
  });

  it('returns the first success and does not retry other failures', async () => {
    let calls = 0;
    const result = await retrying(
      (attempt) => {
        calls++;
        return attempt < 3 ? Promise.reject(serviceError(status.UNAVAILABLE, 'down')) : Promise.resolve('ok');
      },
      opts,
      { sleep: () => Promise.resolve() },
    );
    assert.equal(result, 'ok');
    assert.equal(calls, 3);
    calls = 0;
    await assert.rejects(
      retrying(
        () => (calls++, Promise.reject(new DppaRpcError('GetJob', status.NOT_FOUND, 'job "x" not found'))),
        opts,
        { sleep: () => Promise.resolve() },
      ),
      { code: status.NOT_FOUND },
    );
    assert.equal(calls, 1);
  });

  it('retries for its time budget from the first failure in a row, the last wait ending with the budget', async () => {
    let clock = 1_000_000;
    const notices: RetryNotice[] = [];
    let calls = 0;
    const budget: RetryOptions = { forMs: 10_000, attempts: Infinity, initialDelayMs: 1000, maxDelayMs: 4000 };
    const hooks = { now: () => clock, random: () => 1, onRetry: (n: RetryNotice) => notices.push(n) };
    const down = new DppaRpcError('GetJob', status.UNAVAILABLE, 'connection refused');
    await assert.rejects(
      retrying(() => (calls++, Promise.reject(down)), budget, {
        ...hooks,
        sleep: (ms) => ((clock += ms), Promise.resolve()),
      }),
      (e) => e === down,
    );
    // Waits 1, 2, 4, then 4 s capped to the 3 s left; the attempt at the budget's end fails and is not retried.
    assert.deepEqual(
      notices.map((n) => [n.delayMs, n.leftMs, n.failures]),
      [
        [1000, 10_000, 1],
        [2000, 9000, 2],
        [4000, 7000, 3],
        [3000, 3000, 4],
      ],
    );
    assert.equal(calls, 5);
    assert.equal(notices[0]!.error, down);
    // Progress ends a streak: the budget starts again at the next failure.
    const b = new Backoff(budget, { ...hooks, sleep: (ms) => ((clock += ms), Promise.resolve()) });
    await b.failed(down);
    clock += 9_500;
    b.reset();
    await b.failed(down);
    assert.equal(notices.at(-1)!.leftMs, 10_000);
    // forMs 0: not retried at all.
    calls = 0;
    await assert.rejects(
      retrying(() => (calls++, Promise.reject(down)), { ...budget, forMs: 0 }, hooks),
      (e) => e === down,
    );
    assert.equal(calls, 1);
  });

  it('counts only failures in a row: reset() after progress', async () => {
    const b = new Backoff(
      { forMs: 60_000, attempts: 3, initialDelayMs: 1, maxDelayMs: 1 },
      { sleep: () => Promise.resolve() },
    );
    const err = new Error('drop');
    await b.failed(err);
    await b.failed(err);
    b.reset();
    await b.failed(err);
    await b.failed(err);
    await assert.rejects(b.failed(err), (e) => e === err);
    assert.equal(b.failureCount, 3);
  });

  it("sleep rejects with the signal's reason at once and leaves no timer or listener", async () => {
    const controller = new AbortController();
    const started = Date.now();
    const p = sleep(60_000, controller.signal);
    setTimeout(() => controller.abort(new Error('stop')), 5);
    await assert.rejects(p, /stop/);
    assert.ok(Date.now() - started < 5000);
    // A timer left behind would keep the event loop (and this test) alive for a minute.
    assert.equal(getEventListeners(controller.signal, 'abort').length, 0);
    const signal = new AbortController().signal;
    const pending = sleep(1, signal);
    assert.equal(getEventListeners(signal, 'abort').length, 1);
    await pending;
    assert.equal(getEventListeners(signal, 'abort').length, 0, 'the listener is removed when the wait ends');
    await assert.rejects(sleep(10, AbortSignal.abort(new Error('already'))), /already/);
  });

  it('treats UNAVAILABLE, an attempt out of time and reset streams as transient, everything else not', () => {
    assert.equal(isTransient(serviceError(status.UNAVAILABLE, 'Connection dropped')), true);
    assert.equal(isTransient(serviceError(status.DEADLINE_EXCEEDED, 'Deadline exceeded after 30.001s')), true);
    assert.equal(isTransient(new DppaRpcError('Upload', status.UNAVAILABLE, 'x')), true);
    assert.equal(
      isTransient(serviceError(status.INTERNAL, 'Received RST_STREAM with code 2 (Internal server error)')),
      true,
    );
    assert.equal(isTransient(serviceError(status.CANCELLED, 'Call cancelled')), true);
    assert.equal(isTransient(serviceError(status.CANCELLED, 'Cancelled on client')), false);
    assert.equal(isTransient(serviceError(status.INTERNAL, 'bug')), false);
    for (const code of [
      status.NOT_FOUND,
      status.INVALID_ARGUMENT,
      status.UNAUTHENTICATED,
      status.ALREADY_EXISTS,
      status.FAILED_PRECONDITION,
    ]) {
      assert.equal(isTransient(serviceError(code, 'x')), false, status[code]);
    }
    assert.equal(isTransient(new Error('UNAVAILABLE')), false);
  });
});

describe('errors and call scope', () => {
  it('DppaRpcError says which call failed, what the server said, and the status', () => {
    const raw = serviceError(status.FAILED_PRECONDITION, 'job job-1 is merged');
    assert.ok(isServiceError(raw));
    const e = DppaRpcError.from(raw, 'CancelJob');
    assert.ok(e instanceof DppaRpcError);
    assert.equal(e.message, 'CancelJob failed: job job-1 is merged (FAILED_PRECONDITION)');
    assert.equal(e.codeName, 'FAILED_PRECONDITION');
    assert.equal(e.cause, raw);
    assert.equal(new DppaRpcError('GetJob', status.UNKNOWN, '').message, 'GetJob failed: unknown (UNKNOWN)');
    const other = new TypeError('bug');
    assert.equal(DppaRpcError.from(other, 'GetJob'), other);
  });

  it("CallScope ends a call at its time limit with DEADLINE_EXCEEDED, and follows the caller's signal", async () => {
    const scope = new CallScope('Upload', { timeoutMs: 20 });
    await new Promise((r) => setTimeout(r, 40));
    assert.throws(
      () => scope.check(),
      (e: unknown) => e instanceof DppaRpcError && e.code === status.DEADLINE_EXCEEDED && /20 ms/.test(e.message),
    );
    scope.dispose();
    const controller = new AbortController();
    const linked = new CallScope('Download', { signal: controller.signal });
    controller.abort();
    assert.throws(() => linked.check(), { name: 'AbortError' });
    linked.dispose();
    assert.throws(() => new CallScope('x', { timeoutMs: -1 }), /^RangeError: timeoutMs/);
  });
});
