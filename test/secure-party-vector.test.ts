/**
 * The party's side of a secure job on real pruned deltas, with the protocol's aggregator in process: supports,
 * masked vectors made chunk by chunk (resumed mid-way, the party restored from its 0600 state file between
 * rounds), unmasked sum applied to the base, against the plain merge of the same scaled deltas.
 */
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { pruneToFile } from '../client/index.js';
import {
  maskedChunks,
  unionInMemory,
  unionLength,
  wordsCrc,
  type PartyUnion,
  type UnionTensor,
} from '../client/secure/masked-vector.js';
import { spoolUnion } from '../client/secure/union-spool.js';
import { loadParty, partyStatePath, saveParty } from '../client/secure/party-store.js';
import { scaledTensors, supportOf, type Scaling } from '../client/secure/scaled-delta.js';
import { Checkpoint, decodeToF32, encodeFromF32 } from '../proto/safetensors/index.js';
import {
  SecureAggregator,
  SecureParty,
  decodeSum,
  fixedPoint,
  sumErrorBound,
  unionSupport,
} from '../proto/secure/index.js';
import { crc32c } from '../proto/sparse/index.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

let dir: string;
let base: string;
const deltas: string[] = [];
const SCALINGS: Scaling[] = [
  { factors: [1.4, 0.9], weight: 1 },
  { factors: [1, 1.2], weight: 0.5 },
  { factors: [2, 1], weight: 0.8 },
];

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-secure-vector-'));
  const family = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 11, finetunes: 3 });
  base = family.base;
  for (const [i, ft] of family.finetuned.entries()) {
    const out = join(dir, `p${i + 1}.dppa`);
    await pruneToFile({ base, finetuned: ft, rate: 0.8, out, valueKind: 'delta' });
    deltas.push(out);
  }
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

describe('secure party vector', () => {
  it('masked chunks of three parties sum to the plain merge of their scaled deltas', async () => {
    const job = { jobId: 'job-vector', parties: 3, threshold: 2 };
    // Bound 2: the synthetic deltas (DP at 0.8, rescaled) reach about 1.14, scaled at most 1.6 times.
    const fp = fixedPoint(2, job.parties);
    let clipped = 0;
    // Supports: positions only, per tensor; the server's U is their union tensor by tensor.
    const supports = await Promise.all(deltas.map((d) => collect(supportOf(d))));
    const names = supports[0]!.map((t) => t.name);
    const union: UnionTensor[] = names.map((name) => ({
      name,
      positions: unionSupport(supports.map((s) => Uint32Array.from(s.find((t) => t.name === name)?.positions ?? []))),
    }));
    const length = unionLength(union);
    assert.ok(length > 0);

    // Round 0/1: each party made and stored, restored from its file before each step.
    const workDirs = deltas.map((_, i) => join(dir, `work${i + 1}`));
    for (const [i, w] of workDirs.entries()) {
      const p = SecureParty.create(job, i + 1);
      await saveParty(w, { version: 1, jobId: job.jobId, party: `p${i + 1}`, protocol: p.state });
      assert.equal((await stat(partyStatePath(w))).mode & 0o777, 0o600);
    }
    const restore = async (i: number): Promise<SecureParty> =>
      SecureParty.restore((await loadParty(workDirs[i]!, job.jobId, `p${i + 1}`)).protocol!);
    await assert.rejects(loadParty(workDirs[0]!, job.jobId, 'p2'), /holds the state of party p1/);

    const server = SecureAggregator.create(job);
    for (let i = 0; i < 3; i++) server.advertise((await restore(i)).advertise());
    const roster = server.closeKeys();
    for (let i = 0; i < 3; i++) {
      const p = await restore(i);
      server.submitShares(i + 1, p.shareKeys(roster));
      await saveParty(workDirs[i]!, { version: 1, jobId: job.jobId, party: `p${i + 1}`, protocol: p.state });
    }
    server.closeShares(length);
    const sum = new Uint32Array(length);
    for (let i = 0; i < 3; i++) {
      const p = await restore(i);
      p.receiveShares(server.sharesFor(i + 1));
      await saveParty(workDirs[i]!, { version: 1, jobId: job.jobId, party: `p${i + 1}`, protocol: p.state });
      const party = await restore(i);
      const chunks = await collect(
        maskedChunks(party, fp, unionInMemory(union), scaledTensors(deltas[i]!, SCALINGS[i]!), {
          chunkWords: 1000,
          onClipped: (n) => (clipped += n),
        }),
      );
      // Resumed at an offset inside a chunk, U read back from a file as the push keeps it (written in pieces of
      // 700 positions): the same words from there on.
      const from = 2500 + i * 7;
      const spooled = await spoolUnion(
        join(workDirs[i]!, 'union.bin'),
        (function* () {
          for (const u of union)
            for (let a = 0; a < u.positions.length; a += 700)
              yield { tensor: u.name, positions: Array.prototype.slice.call(u.positions, a, a + 700) as number[] };
        })(),
      );
      assert.deepEqual(
        spooled.tensors,
        union.map((u) => ({ name: u.name, count: u.positions.length })),
      );
      const resumed = await collect(
        maskedChunks(await restore(i), fp, spooled, scaledTensors(deltas[i]!, SCALINGS[i]!), {
          chunkWords: 1000,
          from,
        }),
      );
      const whole = new Uint32Array(length);
      for (const c of chunks) {
        assert.equal(c.crc32c, crc32c(Buffer.from(c.words.buffer, c.words.byteOffset, c.words.byteLength)));
        whole.set(c.words, c.offset);
      }
      assert.equal(chunks.at(-1)!.offset + chunks.at(-1)!.words.length, length);
      assert.equal(resumed[0]!.offset, from);
      for (const c of resumed) {
        assert.deepEqual(c.words, whole.subarray(c.offset, c.offset + c.words.length));
        assert.equal(c.crc32c, wordsCrc(c.words));
      }
      server.submitMasked(i + 1, whole);
      for (let w = 0; w < length; w++) sum[w] = sum[w]! + whole[w]!;
    }
    assert.equal(clipped, 0);
    const request = server.closeMasked();
    for (let i = 0; i < 3; i++) server.submitUnmask((await restore(i)).unmask(request));
    const decoded = decodeSum(server.finish(), fp);

    // Apply: the secure merge (base + decoded sum on U) against the plain merge (fp32 adds, party by party).
    const b = await Checkpoint.open(base);
    try {
      const scaled = await Promise.all(deltas.map((d, i) => collect(scaledTensors(d, SCALINGS[i]!))));
      let offset = 0;
      let same = 0;
      let total = 0;
      let worst = 0;
      let ties = 0;
      for (const u of union) {
        const secure = await b.readF32(u.name);
        const plain = secure.slice();
        for (let j = 0; j < u.positions.length; j++)
          secure[u.positions[j]!] = secure[u.positions[j]!]! + decoded[offset + j]!;
        for (const party of scaled) {
          const t = party.find((x) => x.name === u.name);
          if (t === undefined) continue;
          for (let j = 0; j < t.positions.length; j++) plain[t.positions[j]!] = plain[t.positions[j]!]! + t.values[j]!;
        }
        for (let k = 0; k < plain.length; k++) worst = Math.max(worst, Math.abs(plain[k]! - secure[k]!));
        const dtype = b.info(u.name).dtype;
        const sb = decodeToF32(encodeFromF32(secure, dtype), dtype);
        const pb = decodeToF32(encodeFromF32(plain, dtype), dtype);
        for (let k = 0; k < sb.length; k++) {
          if (sb[k] === pb[k]) {
            same++;
            continue;
          }
          // Otherwise a rounding tie: the two sums straddle the midpoint of two neighbouring bf16 values.
          const mid = (sb[k]! + pb[k]!) / 2;
          const step = Math.abs(sb[k]! - pb[k]!);
          assert.ok(step <= 2 ** -7 * Math.abs(mid), `${u.name}[${k}]: ${pb[k]} and ${sb[k]} are not neighbours`);
          assert.ok(
            Math.abs(plain[k]! - mid) <= sumErrorBound(fp) + 4 * 2 ** -24 * Math.abs(mid),
            `${u.name}[${k}]: plain ${plain[k]}, secure ${secure[k]}: not a rounding tie`,
          );
          ties++;
        }
        total += sb.length;
        offset += u.positions.length;
      }
      // Fixed-point error n·2^−(k+1) plus the fp32 roundings of the two sums (values near 1: 2^−24 each).
      assert.ok(worst <= sumErrorBound(fp) + 4 * 2 ** -23, `largest difference ${worst}`);
      // Ties are frequent here since the synthetic deltas are bf16 scaled by exact weights (0.5, 1): 5 of 28896.
      assert.ok(same / total >= 0.999, `${same} of ${total} identical after bf16 rounding, ${ties} ties`);
    } finally {
      await b.close();
    }
  });

  it('streams the delta in U order, holding no tensor read ahead: a union in another order is refused', async () => {
    const supports = await collect(supportOf(deltas[0]!));
    const inOrder: UnionTensor[] = supports.map((t) => ({ name: t.name, positions: t.positions }));
    const fp = fixedPoint(2, 2);
    // Two parties through keys and shares, so that party 1 can mask.
    const job = { jobId: 'job-order', parties: 2, threshold: 2 };
    const ps = [SecureParty.create(job, 1), SecureParty.create(job, 2)];
    const server = SecureAggregator.create(job);
    for (const p of ps) server.advertise(p.advertise());
    const roster = server.closeKeys();
    ps.forEach((p, i) => server.submitShares(i + 1, p.shareKeys(roster)));
    server.closeShares(unionLength(inOrder));
    ps.forEach((p, i) => p.receiveShares(server.sharesFor(i + 1)));
    const party = (): SecureParty => SecureParty.restore(ps[0]!.state);
    // U in the delta's (the base's) order: every word coded, each tensor read when U reaches it (one read past).
    const starts = inOrder.map((_, k) => unionLength(inOrder.slice(0, k)));
    let read = 0;
    const watched = (async function* () {
      for await (const t of scaledTensors(deltas[0]!, SCALINGS[0]!)) {
        read++;
        yield t;
      }
    })();
    // U's positions too, one tensor at a time and only when coded.
    const positionsRead: number[] = [];
    const memory = unionInMemory(inOrder);
    const watchedUnion: PartyUnion = {
      tensors: memory.tensors,
      positions: (k) => {
        positionsRead.push(k);
        return memory.positions(k);
      },
    };
    let words = 0;
    for await (const c of maskedChunks(party(), fp, watchedUnion, watched, { chunkWords: 1 << 20 })) {
      words += c.words.length;
      const k = starts.findLastIndex((o) => o <= c.offset);
      assert.ok(read <= k + 2, `${read} tensors read while coding tensor ${k}`);
      assert.equal(positionsRead.at(-1), k);
    }
    assert.ok(read === inOrder.length);
    assert.deepEqual(
      positionsRead,
      inOrder.map((_, k) => k),
    );
    assert.equal(words, unionLength(inOrder));
    // Clipped values at a small bound: counted over the whole vector, a resumed run too (the words before `from`
    // counted, not coded; at `from` = |U| nothing is coded and all are counted), and equal to the count of scaled
    // values beyond the bound computed here.
    const small = fixedPoint(0.05, 2);
    let want = 0;
    for await (const t of scaledTensors(deltas[0]!, SCALINGS[0]!))
      for (const v of t.values) if (Math.abs(v) > 0.05) want++;
    assert.ok(want > 0);
    for (const from of [0, 1234, Math.floor(unionLength(inOrder) / 2), unionLength(inOrder)]) {
      let clipped = 0;
      await collect(
        maskedChunks(party(), small, unionInMemory(inOrder), scaledTensors(deltas[0]!, SCALINGS[0]!), {
          from,
          chunkWords: 500,
          onClipped: (n) => (clipped += n),
        }),
      );
      assert.equal(clipped, want, `from ${from}`);
    }
    // The same U with two tensors swapped: refused, not buffered.
    const swapped = [...inOrder];
    [swapped[0], swapped[1]] = [swapped[1]!, swapped[0]!];
    await assert.rejects(
      collect(maskedChunks(party(), fp, unionInMemory(swapped), scaledTensors(deltas[0]!, SCALINGS[0]!))),
      /not in the base checkpoint's tensor order/,
    );
    // A union without one of the party's kept positions (in the last tensor, met in the last chunk): refused.
    const last = inOrder.length - 1;
    const kept = Array.from(inOrder[last]!.positions);
    const missing = [...inOrder];
    missing[last] = { name: inOrder[last]!.name, positions: [...kept.slice(0, -2), kept.at(-1)!] };
    await assert.rejects(
      collect(maskedChunks(party(), fp, unionInMemory(missing), scaledTensors(deltas[0]!, SCALINGS[0]!))),
      new RegExp(`kept position ${kept.at(-2)} is not in the union the server sent`),
    );
    // Small ranges of 7 words: a position removed at either side of a range boundary (the last word of a range, the
    // first of the next), in the first tensor and in the last, is refused too.
    for (const t of [0, last])
      for (const k of [6, 7, 13, 14]) {
        const all = Array.from(inOrder[t]!.positions);
        assert.ok(all.length > 15, `tensor ${t} has ${all.length} positions`);
        const without = [...inOrder];
        without[t] = { name: inOrder[t]!.name, positions: all.filter((_, j) => j !== k) };
        await assert.rejects(
          collect(
            maskedChunks(party(), fp, unionInMemory(without), scaledTensors(deltas[0]!, SCALINGS[0]!), {
              chunkWords: 7,
            }),
          ),
          new RegExp(`kept position ${all[k]} is not in the union the server sent`),
          `tensor ${t}, position ${k}`,
        );
      }
  });

  it('the spooled union is private to its owner even when a file was there before (mode 0600)', async () => {
    const file = join(await mkdtemp(join(tmpdir(), 'dppa-union-mode-')), 'union.bin');
    try {
      await writeFile(file, 'left before', { mode: 0o644 });
      await chmod(file, 0o644);
      const u = await spoolUnion(file, [{ tensor: 't', positions: [2, 3, 5] }]);
      assert.equal((await stat(file)).mode & 0o777, 0o600);
      assert.deepEqual(Array.from(await u.positions(0)), [2, 3, 5]);
    } finally {
      await rm(dirname(file), { recursive: true, force: true });
    }
  });
});
