// The failure policy's rules (server/jobs/failure-policy.ts), error by error: its kinds, how often a task runs, and
// the reason a job fails with. Both backends apply it; test/cluster-failure-policy.test.ts runs it end to end.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FormatError } from '../proto/errors.js';
import { SearchFailedError } from '../server/dpa/job-search.js';
import { NatsUnavailableError } from '../server/errors.js';
import { AttemptsExhaustedError, FailurePolicy } from '../server/jobs/failure-policy.js';
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
    assert.equal(policy.kind(fsError('ENOENT')), 'unexpected');
    assert.equal(policy.kind('a string'), 'unexpected');
    // Without a backend's rule nothing is transient.
    assert.equal(new FailurePolicy().kind(nats), 'unexpected');
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
  });
});
