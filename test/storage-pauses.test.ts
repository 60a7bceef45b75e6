// The paused jobs of a runner (server/jobs/storage-pauses.ts): a pause counts its attempts, and knows what its job had
// done when it began, so that a runner's sweep can end a pause the job outgrew on another replica.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DiskFullError } from '../server/errors.js';
import { StoragePauses } from '../server/jobs/storage-pauses.js';

const full = (): DiskFullError => new DiskFullError('no space left', { cause: new Error('ENOSPC') });

describe('storage pauses', () => {
  it('is outgrown once the job went on from where it was when first paused, not by a later attempt', () => {
    const retried: string[] = [];
    const pauses = new StoragePauses({
      initialMs: 3_600_000,
      retry: (id) => retried.push(id),
      hasRoom: () => Promise.resolve(true),
    });
    try {
      assert.equal(pauses.outgrown('j', 'MERGING/0/0'), false, 'not paused: nothing to outgrow');
      assert.equal(pauses.add('j', full(), 'MERGING/0/0').attempts, 1);
      assert.equal(pauses.waiting('j'), true);
      assert.equal(pauses.outgrown('j', 'MERGING/0/0'), false);
      // A second attempt keeps the marker of the first.
      assert.equal(pauses.retryNow('j'), true);
      assert.deepEqual(retried, ['j']);
      assert.equal(pauses.waiting('j'), false, 'an attempt is running');
      assert.equal(pauses.add('j', full(), 'DPA/3/1').attempts, 2);
      assert.equal(pauses.outgrown('j', 'DPA/3/1'), true);
      assert.equal(pauses.outgrown('j', 'MERGING/0/0'), false);
      pauses.clear('j');
      assert.equal(pauses.get('j'), undefined);
      assert.equal(pauses.outgrown('j', 'DPA/3/1'), false);
    } finally {
      pauses.stop();
    }
  });
});
