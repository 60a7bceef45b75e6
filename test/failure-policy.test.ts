// The failure policy's rules (server/jobs/failure-policy.ts), error by error: its kinds, how often a task runs, and
// the reason a job fails with. Both backends apply it; test/cluster-failure-policy.test.ts runs it end to end.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FormatError } from '../proto/errors.js';
import { SearchFailedError } from '../server/dpa/job-search.js';
import { PartyTimeoutError } from '../server/dpa/remote-evaluators.js';
import { NatsUnavailableError } from '../server/errors.js';
import { AttemptsExhaustedError, FailurePolicy } from '../server/jobs/failure-policy.js';
import { MissingPieceError } from '../server/merge/patch-output.js';
import { SpooledTensorError } from '../server/merge/tensor-merge.js';

const fsError = (code: string): Error => Object.assign(new Error(`${code}: failed, write '/x'`), { code });
const policy = new FailurePolicy({ taskAttempts: 3, transient: (e) => e instanceof NatsUnavailableError });

describe('the failure policy', () => {
  it('sorts errors: storage, party, transient (along the cause chain), permanent, unexpected', () => {
    const nats = new NatsUnavailableError('NATS is away');
    assert.equal(policy.kind(fsError('ENOSPC')), 'storage');
    assert.equal(policy.kind(new Error('writing', { cause: fsError('EIO') })), 'storage');
    assert.equal(policy.kind(new SpooledTensorError('a', 'bad CRC', 'f', 't')), 'party');
    assert.equal(policy.kind(nats), 'transient');
    assert.equal(policy.kind(new SearchFailedError('party a: recording', { cause: nats })), 'transient');
    assert.equal(policy.kind(new FormatError('bad header', { file: 'f' })), 'permanent');
    assert.equal(policy.kind(new SearchFailedError('party a: no candidates')), 'permanent');
    // A merged-patch piece still unusable after its tensor was merged again: another run would do the same.
    const piece = new MissingPieceError('w', 0, 'is missing, and is cut short after its tensor was merged again');
    assert.equal(policy.kind(piece), 'permanent');
    assert.equal(policy.retries(piece, 1), false);
    assert.equal(policy.kind(fsError('ENOENT')), 'unexpected');
    assert.equal(policy.kind('a string'), 'unexpected');
    // Without a backend's rule nothing is transient.
    assert.equal(new FailurePolicy().kind(nats), 'unexpected');
  });

  it("sorts a failed search by its cause: permanent for a party's timeout, damaged input or no cause", () => {
    const search = (cause?: unknown): SearchFailedError =>
      new SearchFailedError('party a: failed', cause === undefined ? undefined : { cause });
    assert.equal(policy.kind(search()), 'permanent');
    assert.equal(policy.kind(search(new PartyTimeoutError('party a did not reconnect within 1 s'))), 'permanent');
    assert.equal(policy.kind(search(new FormatError('bad header', { file: 'f' }))), 'permanent');
    assert.equal(policy.kind(search(new RangeError('no task with a non-zero dense score'))), 'permanent');
    assert.equal(policy.kind(search(fsError('ENOENT'))), 'unexpected');
    assert.equal(policy.kind(search(fsError('ENOSPC'))), 'storage');
    assert.equal(policy.retries(search(fsError('EACCES')), 1), true, 'an unexpected cause runs again');
    assert.deepEqual(policy.verdict('DPA search', policy.final(search(fsError('EACCES')), 3)), {
      action: 'fail',
      reason: 'DPA search failed after 3 attempts: party a: failed',
    });
  });

  it('runs a task again while its failure may pass and runs are left, with a growing delay', () => {
    const unexpected = fsError('ENOENT');
    assert.deepEqual(
      [1, 2, 3].map((n) => policy.retries(unexpected, n)),
      [true, true, false],
    );
    assert.equal(policy.retries(new NatsUnavailableError('away'), 2), true);
    assert.equal(policy.retries(new FormatError('bad'), 1), false);
    assert.equal(policy.retries(fsError('ENOSPC'), 1), false, 'a storage failure pauses instead');
    assert.deepEqual(
      [1, 2, 3, 6, 7, 20].map((n) => policy.retryDelayMs(n)),
      [1000, 2000, 4000, 30_000, 30_000, 30_000],
    );
  });

  it('fails the job with the step, the count and the last error; pauses, sends back or waits otherwise', () => {
    const exhausted = policy.final(fsError('ENOENT'), 3);
    assert.ok(exhausted instanceof AttemptsExhaustedError);
    assert.deepEqual(policy.verdict('merge', exhausted), {
      action: 'fail',
      reason: "merge failed after 3 attempts: ENOENT: failed, write '/x'",
    });
    const format = new FormatError('bad header', { file: 'f.safetensors' });
    assert.equal(policy.final(format, 1), format, 'a permanent failure is final as it is');
    assert.deepEqual(policy.verdict('merge', format), {
      action: 'fail',
      reason: 'merge failed: f.safetensors: bad header',
    });
    assert.deepEqual(policy.verdict('DPA search', new SearchFailedError('party a: gone')), {
      action: 'fail',
      reason: 'DPA search failed: party a: gone',
    });
    assert.equal(policy.verdict('merge', fsError('ENOSPC')).action, 'pause');
    assert.equal(policy.verdict('merge', new SpooledTensorError('a', 'bad CRC', 'f', 't')).action, 'send-back');
    assert.deepEqual(policy.verdict('merge', new NatsUnavailableError('NATS is away')), {
      action: 'wait',
      reason: 'NATS is away',
    });
    // NATS away never fails a job (failing it needs NATS): once a task's runs are spent, its job waits for NATS.
    const spent = policy.final(new NatsUnavailableError('NATS is away'), 3);
    assert.ok(spent instanceof AttemptsExhaustedError);
    assert.equal(policy.verdict('merge', spent).action, 'wait');
    assert.equal(policy.verdict('DPA search', policy.final(new Error('x', { cause: spent }), 3)).action, 'wait');
    assert.equal((policy.final(fsError('ENOENT'), 1) as Error).message, "after 1 attempt: ENOENT: failed, write '/x'");
  });
});
