import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  OUTSIDE_POLICIES,
  outsidePolicyFromWire,
  outsidePolicyToWire,
  parseOutsidePolicy,
  parsePruneMethod,
  partitionFactor,
  PRUNE_METHODS,
  pruneMethodFromWire,
  pruneMethodToWire,
  UnknownValueError,
} from '../proto/algorithm/index.js';
import { jobText } from '../client/cli/job-view.js';
import { OutsidePolicy, PruneMethod } from '../proto/gen/dppa/v1/algorithm.js';
import { Job } from '../proto/gen/dppa/v1/jobs.js';

describe('amplification rule', () => {
  it('partition p takes factor p − 1; partition 0 takes 1, or the largest factor when scaled by max', () => {
    const factors = [1.5, 0.7, 2.25];
    assert.equal(partitionFactor(factors, 1, false), 1.5);
    assert.equal(partitionFactor(factors, 2, false), 0.7);
    assert.equal(partitionFactor(factors, 3, true), 2.25);
    assert.equal(partitionFactor(factors, 0, false), 1);
    assert.equal(partitionFactor(factors, 0, true), 2.25);
    assert.equal(partitionFactor([], 0, true), 1, 'no factor to take the largest of');
  });

  it('refuses a partition without a factor', () => {
    assert.throws(() => partitionFactor([1.5, 0.7], 3, false), /no amplification factor for partition 3 \(2 given\)/);
  });
});

describe('pruning methods and outside policies', () => {
  it('every word has its own enum value, and reads back from it', () => {
    const wire = PRUNE_METHODS.map(pruneMethodToWire);
    assert.deepEqual(wire, [
      PruneMethod.PRUNE_METHOD_DP,
      PruneMethod.PRUNE_METHOD_MAGNITUDE,
      PruneMethod.PRUNE_METHOD_OWL,
      PruneMethod.PRUNE_METHOD_DARE,
    ]);
    for (const m of PRUNE_METHODS) assert.equal(pruneMethodFromWire(pruneMethodToWire(m), ''), m);
    assert.deepEqual(OUTSIDE_POLICIES.map(outsidePolicyToWire), [
      OutsidePolicy.OUTSIDE_POLICY_DENSE,
      OutsidePolicy.OUTSIDE_POLICY_MAGNITUDE,
      OutsidePolicy.OUTSIDE_POLICY_SKIP,
    ]);
  });

  it('a message of an older writer is read from its text; an empty one is unset', () => {
    assert.equal(pruneMethodFromWire(PruneMethod.PRUNE_METHOD_UNSPECIFIED, 'owl'), 'owl');
    assert.equal(pruneMethodFromWire(PruneMethod.PRUNE_METHOD_UNSPECIFIED, ''), undefined);
    assert.equal(pruneMethodFromWire(PruneMethod.PRUNE_METHOD_DARE, 'dare'), 'dare', 'both set and agreeing');
  });

  it('refuses unknown values, naming the field', () => {
    assert.throws(
      () => parsePruneMethod('ties', '--method'),
      (e: unknown) =>
        e instanceof UnknownValueError &&
        e.field === '--method' &&
        /^--method: expected one of dp, magnitude, owl, dare, got "ties"$/.test(e.message),
    );
    assert.throws(() => parseOutsidePolicy('none', 'outside'), {
      message: /^outside: expected one of dense, magnitude, skip, got "none"$/,
    });
    assert.throws(() => parsePruneMethod(undefined, 'method'), {
      message: /^method: expected one of .*, got undefined$/,
    });
    assert.throws(() => pruneMethodFromWire(99 as PruneMethod, ''), {
      message:
        /^prune_method: expected one of PRUNE_METHOD_DP, PRUNE_METHOD_MAGNITUDE, PRUNE_METHOD_OWL, PRUNE_METHOD_DARE, got 99$/,
    });
    assert.throws(() => pruneMethodFromWire(PruneMethod.PRUNE_METHOD_UNSPECIFIED, 'ties', 'DeltaHeader '), {
      message: /^DeltaHeader method: expected one of dp, magnitude, owl, dare, got "ties"$/,
    });
    assert.throws(() => pruneMethodFromWire(PruneMethod.PRUNE_METHOD_DARE, 'dp'), {
      message: /^prune_method: PRUNE_METHOD_DARE disagrees with method "dp"/,
    });
  });

  it('the outside policy: enum first, else the options text; unknown or disagreeing refused naming the field', () => {
    assert.equal(outsidePolicyFromWire(OutsidePolicy.OUTSIDE_POLICY_SKIP, ''), 'skip');
    assert.equal(outsidePolicyFromWire(OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED, 'magnitude'), 'magnitude');
    assert.equal(outsidePolicyFromWire(OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED, ''), undefined);
    assert.throws(() => outsidePolicyFromWire(99 as OutsidePolicy, ''), {
      message: /^outside: expected one of OUTSIDE_POLICY_DENSE, OUTSIDE_POLICY_MAGNITUDE, OUTSIDE_POLICY_SKIP, got 99$/,
    });
    assert.throws(() => outsidePolicyFromWire(OutsidePolicy.OUTSIDE_POLICY_UNSPECIFIED, 'none'), {
      message: /^options.outside: expected one of dense, magnitude, skip, got "none"$/,
    });
    assert.throws(() => outsidePolicyFromWire(OutsidePolicy.OUTSIDE_POLICY_DENSE, 'skip'), {
      message: /^outside: OUTSIDE_POLICY_DENSE disagrees with options.outside "skip"/,
    });
  });

  it('`dppa job status` shows the method the enum names (a server that no longer fills the text)', () => {
    const pruning = (job: Partial<Job>): string =>
      jobText(Job.fromPartial(job))
        .split('\n')
        .find((l) => l.startsWith('  pruning'))!;
    assert.match(pruning({ pruneMethod: PruneMethod.PRUNE_METHOD_OWL, rate: 0.9 }), /^ {2}pruning +owl at rate 0.9/);
    assert.match(pruning({ method: 'dare', rate: 0.9 }), /^ {2}pruning +dare at rate/);
    assert.match(pruning({ rate: 0.9 }), /^ {2}pruning +dp at rate/);
  });
});
