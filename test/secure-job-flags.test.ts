/**
 * `dppa job create --privacy secure`: the flags into the SDK's secure options and the request, and the refusals
 * of what a secure job cannot take (each naming its flag or option).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parsePrivacy } from '../client/cli/job-flags.js';
import { createJobRequest } from '../client/sdk/jobs.js';
import { Privacy } from '../proto/gen/dppa/v1/jobs.js';

describe('secure job flags', () => {
  it('--privacy secure --threshold T [--clip-bound B] [--phase-seconds S]', () => {
    assert.deepEqual(parsePrivacy({ privacy: 'secure', threshold: 2 }, 3), { threshold: 2 });
    assert.deepEqual(parsePrivacy({ privacy: 'secure', threshold: 3, 'clip-bound': 0.25, 'phase-seconds': 3600 }, 5), {
      threshold: 3,
      clipBound: 0.25,
      phaseSeconds: 3600,
    });
    assert.equal(parsePrivacy({}, 3), undefined);
    assert.equal(parsePrivacy({ privacy: 'plain' }, 3), undefined);
    // Factors 1 everywhere is what the server takes anyway.
    assert.deepEqual(parsePrivacy({ privacy: 'secure', threshold: 2, dpa: 'fixed:1,1' }, 2), { threshold: 2 });
    assert.deepEqual(parsePrivacy({ privacy: 'secure', threshold: 2, dpa: 'off' }, 2), { threshold: 2 });
  });

  it('refuses, naming the flag', () => {
    const refuse = (v: Parameters<typeof parsePrivacy>[0], parties: number, message: RegExp): void =>
      assert.throws(() => parsePrivacy(v, parties), { name: 'UsageError', message });
    refuse({ privacy: 'secure' }, 3, /--privacy secure needs --threshold T/);
    refuse({ threshold: 2 }, 3, /^--threshold: only with --privacy secure/);
    refuse({ privacy: 'plain', 'clip-bound': 1, 'phase-seconds': 9 }, 3, /^--clip-bound, --phase-seconds: only with/);
    refuse({ privacy: 'secure', threshold: 4 }, 3, /--threshold: at most the number of parties, 3; got 4/);
    refuse({ privacy: 'secure', threshold: 2, 'clip-bound': 0 }, 3, /--clip-bound: must be > 0/);
    refuse(
      { privacy: 'secure', threshold: 2, dpa: 'search:tuner=golden' },
      3,
      /--dpa search: a secure job runs no factor search/,
    );
    refuse({ privacy: 'secure', threshold: 2, dpa: 'fixed:1.5,1' }, 3, /--dpa fixed: a secure job/);
    refuse({ privacy: 'secure', threshold: 2, evaluator: 'onnx' }, 3, /^--evaluator: a secure job has no evaluator/);
    refuse({ privacy: 'secure', threshold: 2, 'onnx-model': 'm.onnx' }, 3, /^--onnx-model: a secure job/);
    refuse({ privacy: 'secure', threshold: 2, weights: 'a=2' }, 3, /^--weights: the server of a secure job/);
    refuse({ privacy: 'secure', threshold: 2, 'sign-election': true }, 3, /^--sign-election: /);
  });

  it('the SDK request carries privacy, threshold, clip bound and phase seconds, and refuses what a secure job cannot take', () => {
    const base = { basePath: '/srv/base', parties: ['a', 'b', 'c'], rate: 0.9 };
    const req = createJobRequest({ ...base, secure: { threshold: 2 } });
    assert.equal(req.privacy, Privacy.PRIVACY_SECURE);
    assert.equal(req.threshold, 2);
    assert.equal(req.clipBound, 1);
    assert.equal(req.securePhaseSeconds, 0);
    const plain = createJobRequest(base);
    assert.equal(plain.privacy, Privacy.PRIVACY_UNSPECIFIED);
    assert.equal(plain.threshold, 0);
    assert.throws(
      () => createJobRequest({ ...base, secure: { threshold: 1 } }),
      /secure.threshold: must be an integer in \[2, 3\]/,
    );
    assert.throws(() => createJobRequest({ ...base, secure: { threshold: 2, clipBound: -1 } }), /secure.clipBound/);
    assert.throws(
      () => createJobRequest({ ...base, secure: { threshold: 2 }, dpa: { search: {} } }),
      /dpa.search: a secure job searches no factors on the server/,
    );
    assert.throws(
      () => createJobRequest({ ...base, secure: { threshold: 2 }, merge: { weights: { a: 0.5 } } }),
      /merge.weights: a secure job takes no weights at the server \(a: 0.5\)/,
    );
  });
});
