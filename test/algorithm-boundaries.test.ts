// The pruning method and outside policy are checked once, where input enters:
// the CLI names the flag, the SDK the option, the server the request field
// (INVALID_ARGUMENT); and a client that knows only the old `method` text still
// works with this server.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { pruneCommand } from '../client/cli/commands/prune.js';
import { describeFailure } from '../client/cli/exit-codes.js';
import { pruneToFile, type PruneMethod as PruneMethodWord } from '../client/index.js';
import { createJobRequest } from '../client/sdk/jobs.js';
import { OutsidePolicy, PruneMethod } from '../proto/gen/dppa/v1/algorithm.js';
import type { CreateJobRequest } from '../proto/gen/dppa/v1/jobs.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import {
  ADMIN,
  call,
  pruneRecords,
  rejectsWith,
  startHarness,
  upload,
  uploadMessages,
  type Harness,
} from './fixtures/grpc-harness.js';

let dir: string;
let base: string;
let finetuned: string;
let h: Harness;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-algorithm-boundaries-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 11 });
  base = fam.base;
  finetuned = fam.finetuned[0]!;
  h = await startHarness(join(dir, 'data'));
});
after(async () => {
  await h?.close();
  await rm(dir, { recursive: true, force: true });
});

function request(fields: Partial<CreateJobRequest>): CreateJobRequest {
  return {
    basePath: base,
    parties: ['a'],
    rate: 0.9,
    method: '',
    label: '',
    dpa: undefined,
    merge: undefined,
    maxAbsValue: 0,
    pruneMethod: 0,
    privacy: 0,
    threshold: 0,
    clipBound: 0,
    securePhaseSeconds: 0,
    ...fields,
  };
}

describe('an unknown method or outside policy is refused where it enters', () => {
  it('dppa prune names the flag (exit code 2)', async () => {
    for (const [args, message] of [
      [['--method', 'ties'], /^--method: expected one of dp, magnitude, owl, dare, got "ties"$/],
      [['--outside', 'none'], /^--outside: expected one of dense, magnitude, skip, got "none"$/],
    ] as const) {
      const err = await pruneCommand
        .run(['--base', base, '--finetuned', finetuned, '--rate', '0.9', '--out', join(dir, 'x.dppa'), ...args])
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      assert.ok(err instanceof Error, args.join(' '));
      assert.equal(describeFailure(err).code, 2, err.message);
      assert.match(err.message, message);
    }
  });

  it('the SDK names the option', async () => {
    const out = join(dir, 'y.dppa');
    await assert.rejects(pruneToFile({ base, finetuned, rate: 0.9, method: 'ties' as PruneMethodWord, out }), {
      name: 'UnknownValueError',
      message: /^method: expected one of dp, magnitude, owl, dare, got "ties"$/,
    });
    await assert.rejects(pruneToFile({ base, finetuned, rate: 0.9, outside: 'none' as 'dense', out }), {
      message: /^outside: expected one of dense, magnitude, skip, got "none"$/,
    });
    assert.throws(
      () => createJobRequest({ basePath: base, parties: ['a'], rate: 0.9, method: 'ties' as PruneMethodWord }),
      (e: unknown) => e instanceof RangeError && /^method: expected one of/.test(e.message),
    );
  });

  it('CreateJob answers INVALID_ARGUMENT naming the field', async () => {
    await rejectsWith(
      call(h.jobs, 'createJob', request({ method: 'ties' }), ADMIN),
      status.INVALID_ARGUMENT,
      /^method: expected one of dp, magnitude, owl, dare, got "ties"$/,
    );
    await rejectsWith(
      call(h.jobs, 'createJob', request({ pruneMethod: 99 as PruneMethod }), ADMIN),
      status.INVALID_ARGUMENT,
      /^prune_method: expected one of PRUNE_METHOD_DP, .*got 99$/,
    );
    await rejectsWith(
      call(h.jobs, 'createJob', request({ method: 'dp', pruneMethod: PruneMethod.PRUNE_METHOD_DARE }), ADMIN),
      status.INVALID_ARGUMENT,
      /^prune_method: PRUNE_METHOD_DARE disagrees with method "dp"/,
    );
  });

  it('Upload answers INVALID_ARGUMENT naming the header field', async () => {
    const { job, tokens } = await call(
      h.jobs,
      'createJob',
      request({ pruneMethod: PruneMethod.PRUNE_METHOD_MAGNITUDE }),
      ADMIN,
    );
    const records = await pruneRecords({ base, finetuned, rate: 0.9, method: 'magnitude' });
    const header = structuredClone(records[0]!);
    header.header!.pruneMethod = 77 as PruneMethod;
    await rejectsWith(
      upload(h.uploads, tokens.a!, uploadMessages(job!.id, 'a', [header])),
      status.INVALID_ARGUMENT,
      /^DeltaHeader prune_method: expected one of .*got 77$/,
    );
  });

  it('Upload answers INVALID_ARGUMENT for an unknown outside policy, or one its options text contradicts', async () => {
    const { job, tokens } = await call(
      h.jobs,
      'createJob',
      request({ pruneMethod: PruneMethod.PRUNE_METHOD_MAGNITUDE }),
      ADMIN,
    );
    const records = await pruneRecords({ base, finetuned, rate: 0.9, method: 'magnitude' });
    assert.equal(records[0]!.header!.outside, OutsidePolicy.OUTSIDE_POLICY_DENSE, 'this client writes the enum');
    const unknown = structuredClone(records[0]!);
    unknown.header!.outside = 99 as OutsidePolicy;
    await rejectsWith(
      upload(h.uploads, tokens.a!, uploadMessages(job!.id, 'a', [unknown])),
      status.INVALID_ARGUMENT,
      /^DeltaHeader outside: expected one of OUTSIDE_POLICY_DENSE, .*got 99$/,
    );
    const disagreeing = structuredClone(records[0]!);
    disagreeing.header!.outside = OutsidePolicy.OUTSIDE_POLICY_SKIP;
    disagreeing.header!.options['outside'] = 'dense';
    await rejectsWith(
      upload(h.uploads, tokens.a!, uploadMessages(job!.id, 'a', [disagreeing])),
      status.INVALID_ARGUMENT,
      /^DeltaHeader outside: OUTSIDE_POLICY_SKIP disagrees with DeltaHeader options.outside "dense"/,
    );
  });
});

describe('clients on either side of the enum', () => {
  it('a job created with the text alone (an older client) shows both, and so does one created with the enum alone', async () => {
    const old = await call(h.jobs, 'createJob', request({ method: 'owl' }), ADMIN);
    assert.equal(old.job!.method, 'owl');
    assert.equal(old.job!.pruneMethod, PruneMethod.PRUNE_METHOD_OWL);
    const unset = await call(h.jobs, 'createJob', request({}), ADMIN);
    assert.equal(unset.job!.method, 'dp', 'neither set: DP');
    assert.equal(unset.job!.pruneMethod, PruneMethod.PRUNE_METHOD_DP);
    const fresh = await call(h.jobs, 'createJob', request({ pruneMethod: PruneMethod.PRUNE_METHOD_DARE }), ADMIN);
    assert.equal(fresh.job!.method, 'dare');
  });

  it('a delta header with the text alone (an older client) is taken', async () => {
    const { job, tokens } = await call(h.jobs, 'createJob', request({ method: 'magnitude' }), ADMIN);
    const records = await pruneRecords({ base, finetuned, rate: 0.9, method: 'magnitude' });
    assert.equal(records[0]!.header!.pruneMethod, PruneMethod.PRUNE_METHOD_MAGNITUDE, 'this client writes the enum');
    assert.equal(records[0]!.header!.method, 'magnitude', 'and the text, for older servers');
    const oldHeader = structuredClone(records[0]!);
    oldHeader.header!.pruneMethod = PruneMethod.PRUNE_METHOD_UNSPECIFIED;
    oldHeader.header!.outside = 0;
    const state = await upload(h.uploads, tokens.a!, uploadMessages(job!.id, 'a', [oldHeader, ...records.slice(1)]));
    assert.equal(state.complete, true);
  });
});
