import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { deserialize, serialize } from 'node:v8';
import {
  DuplicateSubmissionError,
  MaskedLengthError,
  ProtocolStateError,
  SecureAggregator,
  SecureParty,
  ShareAuthError,
  TooFewSurvivorsError,
  addInto,
  decodeSum,
  encodeFixed,
  fixedPoint,
  removeMasks,
  spreadOnUnion,
  sumErrorBound,
  unionSupport,
  type EncryptedShare,
  type FixedPoint,
  type SecureJob,
} from '../proto/secure/index.js';

/** A party's sparse values: sorted positions in [0, space) and a value at each. */
interface Sparse {
  positions: Uint32Array;
  values: Float32Array;
}

function randomSparse(space: number, density: number, bound: number): Sparse {
  const positions: number[] = [];
  for (let p = 0; p < space; p++) if (Math.random() < density) positions.push(p);
  // Most values inside the bound, a few beyond it (clipped).
  const values = Float32Array.from(positions, () => (Math.random() < 0.01 ? 3 : 1.8) * bound * (Math.random() - 0.5));
  return { positions: Uint32Array.from(positions), values };
}

/** Stores and restores a state as a server or party would across a restart. */
function roundTrip<T>(state: T): T {
  return deserialize(serialize(state)) as T;
}

/** Round 0 of `job` (every party advertises, the server closes the roster) and each party's boxes for round 1. */
function upToRelay(job: SecureJob) {
  const parties = Array.from({ length: job.parties }, (_, i) => SecureParty.create(job, i + 1));
  const server = SecureAggregator.create(job);
  for (const p of parties) server.advertise(p.advertise());
  const roster = server.closeKeys();
  const outboxes = parties.map((p) => p.shareKeys(roster));
  return { job, parties, server, roster, outboxes };
}

/** Rounds 0 and 1 of `job` up to the relay of the shares: every party's boxes submitted. */
function upToShares(job: SecureJob) {
  const run = upToRelay(job);
  run.outboxes.forEach((boxes, i) => run.server.submitShares(i + 1, boxes));
  return run;
}

interface RunOptions {
  job: SecureJob;
  fp: FixedPoint;
  inputs: Sparse[];
  /** Parties that stop after sending their shares, before their masked upload. */
  dropBeforeMasked?: number[];
  /** Parties that stop after their masked upload, before unmasking. */
  dropAfterMasked?: number[];
  /** Store and restore every state between rounds. */
  restart?: boolean;
}

/** The protocol in process, party i holding inputs[i − 1]. */
function run(opts: RunOptions): { union: Uint32Array; words: Uint32Array; survivors: number[] } {
  const { job, fp, inputs } = opts;
  const restart = opts.restart ?? false;
  let parties = inputs.map((_, i) => SecureParty.create(job, i + 1));
  let server = SecureAggregator.create(job);
  const reload = (): void => {
    if (!restart) return;
    parties = parties.map((p) => SecureParty.restore(roundTrip(p.state)));
    server = SecureAggregator.restore(roundTrip(server.state));
  };
  for (const p of parties) server.advertise(p.advertise());
  const roster = server.closeKeys();
  reload();
  for (const p of parties) server.submitShares(p.state.index, p.shareKeys(roster));
  reload();
  const union = unionSupport(inputs.map((x) => x.positions));
  server.closeShares(union.length);
  const before = new Set(opts.dropBeforeMasked ?? []);
  const after = new Set(opts.dropAfterMasked ?? []);
  for (const p of parties) {
    const i = p.state.index;
    p.receiveShares(server.sharesFor(i));
    if (before.has(i)) continue;
    const input = inputs[i - 1]!;
    server.submitMasked(i, p.maskInput(spreadOnUnion(union, input.positions, input.values), fp).words);
  }
  reload();
  const request = server.closeMasked();
  reload();
  for (const p of parties) {
    const i = p.state.index;
    if (before.has(i) || after.has(i)) continue;
    server.submitUnmask(p.unmask(request));
  }
  reload();
  return { union, words: server.finish(), survivors: request.survivors };
}

/** The expected sum on the union, computed from the inputs directly: integers, and floats. */
function plainSum(
  fp: FixedPoint,
  inputs: Sparse[],
  survivors: number[],
): { ints: Map<number, number>; floats: Map<number, number>; inBound: Set<number> } {
  const ints = new Map<number, number>();
  const floats = new Map<number, number>();
  const clippedAt = new Set<number>();
  for (const i of survivors) {
    const { positions, values } = inputs[i - 1]!;
    positions.forEach((p, j) => {
      const x = values[j]!;
      if (Math.abs(x) > fp.bound) clippedAt.add(p);
      const clipped = Math.max(-fp.bound, Math.min(fp.bound, x));
      ints.set(p, (ints.get(p) ?? 0) + Math.round(clipped * 2 ** fp.scaleBits));
      floats.set(p, (floats.get(p) ?? 0) + x);
    });
  }
  const inBound = new Set([...floats.keys()].filter((p) => !clippedAt.has(p)));
  return { ints, floats, inBound };
}

function checkSum(fp: FixedPoint, inputs: Sparse[], result: ReturnType<typeof run>, expectedSurvivors: number[]): void {
  assert.deepEqual(result.survivors, expectedSurvivors);
  const { ints, floats, inBound } = plainSum(fp, inputs, expectedSurvivors);
  const decoded = decodeSum(result.words, fp);
  let checked = 0;
  result.union.forEach((p, u) => {
    // Exactly the sum of the coded values (0 where no survivor kept the position).
    assert.equal(result.words[u]! | 0, ints.get(p) ?? 0, `position ${p}`);
    if (inBound.has(p)) {
      assert.ok(
        Math.abs(decoded[u]! - floats.get(p)!) <= sumErrorBound(fp),
        `position ${p}: ${decoded[u]} vs ${floats.get(p)}`,
      );
      checked++;
    }
  });
  assert.ok(checked > 0.9 * ints.size, `${checked} of ${ints.size} positions within the bound`);
}

describe('secure aggregation, in process', () => {
  it('3 parties: the unmasked sum is the sum of the coded values, and the float sum within n·step/2', () => {
    const job = { jobId: 'job-3', parties: 3, threshold: 2 };
    const fp = fixedPoint(0.02, 3);
    const inputs = [1, 2, 3].map(() => randomSparse(20000, 0.1, 0.02));
    checkSum(fp, inputs, run({ job, fp, inputs }), [1, 2, 3]);
  });

  it('5 parties, t = 3, every state stored and restored between rounds', () => {
    const job = { jobId: 'job-5', parties: 5, threshold: 3 };
    const fp = fixedPoint(0.02, 5);
    const inputs = [1, 2, 3, 4, 5].map(() => randomSparse(20000, 0.1, 0.02));
    checkSum(fp, inputs, run({ job, fp, inputs, restart: true }), [1, 2, 3, 4, 5]);
  });

  it('5 parties, t = 3: one drops before its masked upload, one after it; the sum of the 4 uploads comes back', () => {
    const job = { jobId: 'job-drop', parties: 5, threshold: 3 };
    const fp = fixedPoint(0.02, 5);
    const inputs = [1, 2, 3, 4, 5].map(() => randomSparse(20000, 0.1, 0.02));
    // Party 2 drops before uploading (its pairwise masks are rebuilt from its key shares);
    // party 5 uploads and then drops (its seed is rebuilt from the others' shares).
    const result = run({ job, fp, inputs, dropBeforeMasked: [2], dropAfterMasked: [5], restart: true });
    checkSum(fp, inputs, result, [1, 3, 4, 5]);
  });

  it("the server's stored state holds no party's private key or seed, nor a party's coded values", () => {
    const job = { jobId: 'job-state', parties: 3, threshold: 2 };
    const fp = fixedPoint(1, 3);
    const length = 4096;
    const values = [1, 2, 3].map(() => Float32Array.from({ length }, () => Math.random() * 2 - 1));
    const { parties, server } = upToShares(job);
    server.closeShares(length);
    for (const p of parties) {
      p.receiveShares(server.sharesFor(p.state.index));
      // Party 3 drops before its upload: the server rebuilds its mask key while unmasking.
      if (p.state.index !== 3) server.submitMasked(p.state.index, p.maskInput(values[p.state.index - 1]!, fp).words);
    }
    const stored = (): Buffer => serialize(server.state);
    const secrets = parties.flatMap((p) => [
      p.state.maskKeys.privateKey,
      p.state.shareKeys.privateKey,
      p.state.selfSeed,
    ]);
    const request = server.closeMasked();
    for (const p of parties.slice(0, 2)) server.submitUnmask(p.unmask(request));
    server.maskRemoval();
    for (const secret of secrets) assert.equal(stored().indexOf(Buffer.from(secret)), -1);
    // The search finds what the server does store: the public keys.
    assert.notEqual(stored().indexOf(Buffer.from(parties[0]!.state.maskKeys.publicKey)), -1);
    // A run of 8 coded values of party 1 (32 bytes) appears nowhere in what the server stores.
    const coded = encodeFixed(values[0]!, fp).words;
    for (let at = 0; at + 8 <= length; at += 512) {
      assert.equal(stored().indexOf(Buffer.from(coded.buffer, coded.byteOffset + 4 * at, 32)), -1, `values at ${at}`);
    }
  });

  it('fewer than t survivors: a typed error', () => {
    const job = { jobId: 'job-few', parties: 5, threshold: 3 };
    const fp = fixedPoint(0.02, 5);
    const inputs = [1, 2, 3, 4, 5].map(() => randomSparse(2000, 0.1, 0.02));
    // Three masked uploads, but one of those parties drops before unmasking: two responses.
    assert.throws(
      () => run({ job, fp, inputs, dropBeforeMasked: [1, 2], dropAfterMasked: [3] }),
      (err: unknown) => {
        assert.ok(err instanceof TooFewSurvivorsError);
        assert.equal(err.have, 2);
        assert.equal(err.needed, 3);
        return true;
      },
    );
    // Only two masked uploads: the server refuses to go on to unmasking.
    assert.throws(() => run({ job, fp, inputs, dropBeforeMasked: [1, 2, 3] }), TooFewSurvivorsError);
  });

  it('spooled, range by range: parties mask chunks at offsets, the server sums and unmasks each range on its own', () => {
    const job = { jobId: 'job-spool', parties: 4, threshold: 3 };
    const fp = fixedPoint(1, 4);
    const length = 10007;
    const values = [1, 2, 3, 4].map(() => Float32Array.from({ length }, () => Math.random() * 2 - 1));
    const { parties, server } = upToShares(job);
    server.closeShares(length, { spooled: true });
    // The spool: each party's masked words, written chunk by chunk at odd offsets; party 4 never uploads.
    const spool = new Map<number, Uint32Array>();
    const cuts = [0, 1, 333, 4097, 9000, length];
    for (const p of parties.slice(0, 3)) {
      const i = p.state.index;
      p.receiveShares(server.sharesFor(i));
      const words = new Uint32Array(length);
      for (let c = 0; c + 1 < cuts.length; c++)
        words.set(p.maskInput(values[i - 1]!.subarray(cuts[c], cuts[c + 1]), fp, cuts[c]).words, cuts[c]);
      spool.set(i, words);
      server.recordMasked(i, length);
    }
    assert.throws(() => server.submitMasked(4, new Uint32Array(length)), ProtocolStateError);
    const request = server.closeMasked();
    assert.deepEqual(request, { survivors: [1, 2, 3], dropouts: [4] });
    for (const p of parties.slice(0, 3)) server.submitUnmask(p.unmask(request));
    const removal = server.maskRemoval();
    const result = new Float64Array(length);
    for (let c = 0; c + 1 < cuts.length; c++) {
      const [from, to] = [cuts[c]!, cuts[c + 1]!];
      const sum = new Uint32Array(to - from);
      for (const words of spool.values()) addInto(sum, words.subarray(from, to));
      removeMasks(sum, removal, from);
      result.set(decodeSum(sum, fp), from);
    }
    for (let k = 0; k < length; k++) {
      const plain = values[0]![k]! + values[1]![k]! + values[2]![k]!;
      assert.ok(Math.abs(result[k]! - plain) <= sumErrorBound(fp), `word ${k}: ${result[k]} vs ${plain}`);
    }
    assert.throws(() => server.finish(), ProtocolStateError);
    // The caller says the spool is unmasked: a restored server knows unmasking is over.
    server.complete();
    assert.equal(SecureAggregator.restore(roundTrip(server.state)).phase, 'done');
    assert.deepEqual(server.maskRemoval(), removal, 'the removal can still be rebuilt after a restart');
  });

  it('hands out copies: changing what a close returns leaves the stored state as it was', () => {
    const job = { jobId: 'job-copies', parties: 3, threshold: 2 };
    const parties = [1, 2, 3].map((i) => SecureParty.create(job, i));
    const server = SecureAggregator.create(job);
    for (const p of parties) server.advertise(p.advertise());
    const roster = server.closeKeys();
    const outboxes = parties.map((p) => p.shareKeys(structuredClone(roster)));
    roster[0]!.index = 9;
    roster[0]!.maskPublicKey.fill(0);
    roster.pop();
    assert.deepEqual(
      server.state.roster.map((a) => a.index),
      [1, 2, 3],
    );
    assert.deepEqual(server.state.roster[0]!.maskPublicKey, parties[0]!.state.maskKeys.publicKey);
    outboxes.forEach((boxes, i) => server.submitShares(i + 1, boxes));
    const sharers = server.closeShares(4);
    sharers.length = 0;
    assert.deepEqual(server.state.sharers, [1, 2, 3]);
    const fp = fixedPoint(1, 3);
    for (const p of parties.slice(0, 2)) {
      p.receiveShares(server.sharesFor(p.state.index));
      server.submitMasked(p.state.index, p.maskInput([0.5, 0, 0, 0], fp).words);
    }
    const request = server.closeMasked();
    request.survivors.push(3);
    request.dropouts.length = 0;
    assert.deepEqual(server.state.request, { survivors: [1, 2], dropouts: [3] });
    assert.throws(() => server.complete(), ProtocolStateError, 'not spooled: finish removes the masks');
  });

  it('the masked words of a party look uniform (chi-square on their bytes) though its values are mostly 0', () => {
    const job = { jobId: 'job-chi', parties: 3, threshold: 2 };
    const fp = fixedPoint(0.02, 3);
    const { parties, server } = upToShares(job);
    server.closeShares(1 << 16);
    const party = parties[0]!;
    party.receiveShares(server.sharesFor(1));
    const values = new Float32Array(1 << 16);
    for (let i = 0; i < values.length; i += 10) values[i] = 0.001 * (i % 7);
    const masked = party.maskInput(values, fp).words;
    const plain = new Uint32Array(values.length);
    for (let i = 0; i < values.length; i++) plain[i] = Math.round(values[i]! * 2 ** fp.scaleBits);

    const chiSquare = (words: Uint32Array): number => {
      const bytes = new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
      const counts = new Float64Array(256);
      for (const b of bytes) counts[b]!++;
      const expected = bytes.length / 256;
      return counts.reduce((sum, c) => sum + (c - expected) ** 2 / expected, 0);
    };
    // Critical value at p = 1e-6 for 255 degrees of freedom (Wilson–Hilferty approximation).
    const df = 255;
    const z = 4.753;
    const critical = df * (1 - 2 / (9 * df) + z * Math.sqrt(2 / (9 * df))) ** 3;
    assert.ok(chiSquare(masked) < critical, `masked: ${chiSquare(masked)} ≥ ${critical}`);
    assert.ok(chiSquare(plain) > critical, 'the unmasked coding is far from uniform (the test can fail)');
  });
});

describe('secure aggregation refuses bad input with typed errors, state unchanged', () => {
  it('a tampered share: the recipient refuses it, then takes the intact one', () => {
    const { parties, server, outboxes } = upToRelay({ jobId: 'job-t', parties: 3, threshold: 2 });
    outboxes.forEach((boxes, i) => server.submitShares(i + 1, boxes));
    server.closeShares(10);
    const delivered = server.sharesFor(2);
    const tampered: EncryptedShare[] = delivered.map((s, i) =>
      i === 0 ? { ...s, box: s.box.map((b, j) => (j === 40 ? b ^ 1 : b)) } : s,
    );
    assert.throws(() => parties[1]!.receiveShares(tampered), ShareAuthError);
    assert.equal(parties[1]!.phase, 'shares');
    parties[1]!.receiveShares(delivered);
    assert.equal(parties[1]!.phase, 'input');
    const keys = parties[1]!.maskKeys();
    assert.equal(parties[1]!.maskKeys(), keys, 'derived once, not per chunk');
    // Delivered again after a restart: ignored, the masks stay the same.
    parties[1]!.receiveShares(delivered);
    assert.deepEqual(parties[1]!.maskKeys(), keys);
    assert.throws(() => parties[1]!.receiveShares(delivered.slice(1)), ProtocolStateError);
  });

  it('a share replayed from another job is refused, even between parties with the same keys', () => {
    const a = upToRelay({ jobId: 'job-a', parties: 3, threshold: 2 });
    // Job b's party 2 holds the same keys as job a's (restored from its state with another job id).
    const twin = SecureParty.restore({ ...roundTrip(a.parties[1]!.state), job: { ...a.job, jobId: 'job-b' } });
    // Both boxes were sealed in job a (by its parties 1 and 3): job b's party 2 cannot open either; the first is named.
    const aFrom1 = a.outboxes[0]!.find((s) => s.to === 2)!;
    const aFrom3 = a.outboxes[2]!.find((s) => s.to === 2)!;
    assert.throws(
      () => twin.receiveShares([aFrom1, aFrom3]),
      (err: unknown) => err instanceof ShareAuthError && err.sender === 1,
    );
  });

  it('the roster sent again: taken with the same keys, refused with new keys under the same indices', () => {
    const { parties, roster, outboxes } = upToRelay({ jobId: 'job-r', parties: 3, threshold: 2 });
    assert.deepEqual(parties[0]!.shareKeys(structuredClone(roster)), outboxes[0]);
    const swapped = structuredClone(roster);
    swapped[2]!.maskPublicKey = SecureParty.create(
      { jobId: 'job-r', parties: 3, threshold: 2 },
      3,
    ).advertise().maskPublicKey;
    assert.throws(() => parties[0]!.shareKeys(swapped), ProtocolStateError);
  });

  it('a share delivered to the wrong recipient is refused', () => {
    const { parties, outboxes } = upToRelay({ jobId: 'job-w', parties: 3, threshold: 2 });
    const toTwo = outboxes[0]!.find((s) => s.to === 2)!;
    const fromTwo = outboxes[1]!.find((s) => s.to === 3)!;
    // As addressed (to 2) and readdressed to 3: party 3 cannot open it either way.
    assert.throws(() => parties[2]!.receiveShares([toTwo, fromTwo]), ShareAuthError);
    assert.throws(() => parties[2]!.receiveShares([{ ...toTwo, to: 3 }, fromTwo]), ShareAuthError);
    assert.equal(parties[2]!.phase, 'shares');
  });

  it('a party that sends its shares twice is refused; a box delivered twice too', () => {
    const { parties, server, outboxes } = upToRelay({ jobId: 'job-d', parties: 3, threshold: 2 });
    server.submitShares(1, outboxes[0]!);
    assert.throws(() => server.submitShares(1, outboxes[0]!), DuplicateSubmissionError);
    server.submitShares(2, outboxes[1]!);
    server.submitShares(3, outboxes[2]!);
    server.closeShares(10);
    const delivered = server.sharesFor(1);
    assert.equal(delivered.length, 2);
    assert.throws(() => parties[0]!.receiveShares([...delivered, delivered[0]!]), DuplicateSubmissionError);
    assert.throws(() => server.submitShares(2, outboxes[1]!), ProtocolStateError);
  });

  it('a wrong-length or second masked vector is refused; the sum is untouched', () => {
    const { parties, server, outboxes } = upToRelay({ jobId: 'job-l', parties: 3, threshold: 2 });
    outboxes.forEach((boxes, i) => server.submitShares(i + 1, boxes));
    server.closeShares(100);
    const fp = fixedPoint(1, 3);
    parties.forEach((p, i) => p.receiveShares(server.sharesFor(i + 1)));
    assert.throws(
      () => server.submitMasked(1, parties[0]!.maskInput(new Float32Array(99), fp).words),
      MaskedLengthError,
    );
    assert.throws(
      () => server.submitMasked(1, parties[0]!.maskInput(new Float32Array(101), fp).words),
      MaskedLengthError,
    );
    assert.ok(server.state.sum.every((w) => w === 0));
    const ones = new Float32Array(100).fill(0.5);
    for (const p of parties) server.submitMasked(p.state.index, p.maskInput(ones, fp).words);
    assert.throws(() => server.submitMasked(3, parties[2]!.maskInput(ones, fp).words), DuplicateSubmissionError);
    const request = server.closeMasked();
    for (const p of parties) server.submitUnmask(p.unmask(request));
    assert.throws(() => server.submitUnmask(parties[0]!.unmask(request)), DuplicateSubmissionError);
    assert.deepEqual(Array.from(decodeSum(server.finish(), fp)), new Array<number>(100).fill(1.5));
  });

  it('a party never reveals both secrets of one party: a second, different unmask request is refused', () => {
    const { parties, server, outboxes } = upToRelay({ jobId: 'job-u', parties: 3, threshold: 2 });
    outboxes.forEach((boxes, i) => server.submitShares(i + 1, boxes));
    server.closeShares(4);
    parties.forEach((p, i) => p.receiveShares(server.sharesFor(i + 1)));
    const first = parties[0]!.unmask({ survivors: [1, 2, 3], dropouts: [] });
    assert.deepEqual(parties[0]!.unmask({ survivors: [1, 2, 3], dropouts: [] }), first);
    assert.throws(() => parties[0]!.unmask({ survivors: [1, 2], dropouts: [3] }), ProtocolStateError);
    assert.throws(() => parties[1]!.unmask({ survivors: [1, 3], dropouts: [2] }), ProtocolStateError);
    assert.throws(() => parties[1]!.unmask({ survivors: [1, 2], dropouts: [] }), ProtocolStateError);
  });
});
