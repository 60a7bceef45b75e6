/**
 * `push` for a secure job (docs/privacy.md): prune, search the factors locally, upload the support, then the
 * protocol's rounds (keys, shares, masked vector on U, unmask) against SecureAggregationService. Every step is
 * resumable: the party's private state is kept in its working folder and each round's answer is the same when sent
 * again, so a push run again after a crash or Ctrl-C goes on where it stopped.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { status as Status } from '@grpc/grpc-js';
import { JobState, Privacy, SecurePhase, type Job } from '../../proto/gen/dppa/v1/jobs.js';
import type { MaskedChunk, MaskedState, SupportChunk } from '../../proto/gen/dppa/v1/secure.js';
import type { UploadState } from '../../proto/gen/dppa/v1/upload.js';
import { fixedPoint, SecureParty, ShareAuthError, type KeyAdvertisement } from '../../proto/secure/index.js';
import { crc32c, decodeChunk, readDeltaHeader } from '../../proto/sparse/index.js';
import type { FactorSearchOptions } from '../../proto/algorithm/index.js';
import { searchLocally, type LocalSearchEvent } from '../secure/local-search.js';
import { maskedChunks, type PartyUnion } from '../secure/masked-vector.js';
import { loadParty, saveParty, type StoredParty } from '../secure/party-store.js';
import { scaledTensors } from '../secure/scaled-delta.js';
import { supportHeader, supportRecords } from '../secure/support-records.js';
import { spoolUnion, type UnionPiece } from '../secure/union-spool.js';
import { inScope, readStream, type CallScope } from './call.js';
import type { Connection } from './connection.js';
import { DppaRpcError, JobStateError } from './errors.js';
import type { EvaluateFn } from './evaluate.js';
import { jobStateName } from './jobs.js';
import {
  checkHeader,
  keptDelta,
  partyUploadState,
  uploadRecords,
  UploadStream,
  type PushCallOptions,
  type PushOptions,
  type RecordSource,
} from './push.js';
import { isTransient, sleep } from './retry.js';

/** What a party brings to a secure job beyond its delta (see {@link PushOptions}). */
export interface SecurePushOptions {
  /**
   * The party's working folder: its private protocol state (`secure-party.state`, mode 0600, never sent), the
   * pruned delta (`delta.dppa` unless `keepDelta` says otherwise), the search record and its candidates.
   */
  workDir: string;
  /** Scores a candidate, as for a federated search: the party's factors are searched locally with it. @default no search: factors 1 (or `factors`) */
  evaluate?: EvaluateFn;
  /** Search settings. @default whole (Method 2), greedy from 1 in steps of 0.1 (the server's defaults) */
  search?: Omit<FactorSearchOptions, 'partitions'>;
  /** The party's own factors, one per partition, instead of a search. */
  factors?: number[];
  /** The party's weight c in the sum. @default 1 */
  weight?: number;
  /** Scale outside tensors by the largest factor. @default false */
  outsideByMax?: boolean;
  /** Base and fine-tuned checkpoints for the search when the push sends a `.dppa` file (`delta`). */
  base?: string;
  finetuned?: string;
  /** Attempts after the first of a failing evaluation. @default 2 */
  retries?: number;
  /** How often the phase is polled while waiting for the other parties, ms. @default 1000 */
  pollMs?: number;
}

/** Progress of a secure push's rounds. */
export type SecureProgress =
  | { step: 'search'; event: LocalSearchEvent }
  | { step: 'factors'; factors: number[]; domainRatio?: number }
  | { step: 'waiting'; phase: string }
  | { step: 'keys'; index: number }
  | { step: 'shares'; sent: number }
  | { step: 'received'; peers: number[] }
  | { step: 'union'; words: number }
  | { step: 'masked'; wordsSent: number; wordsTotal: number; attempt: number }
  | { step: 'maskedComplete'; wordsTotal: number; clipped: number | undefined }
  | { step: 'unmasked'; survivors: number[]; dropouts: number[] }
  | { step: 'excluded'; phase: string };

/** The phase as a lower-case word (`masked_input`). */
export function securePhaseName(p: SecurePhase): string {
  return SecurePhase[p]?.replace('SECURE_PHASE_', '').toLowerCase() ?? String(p);
}

/**
 * The secure branch of `push`: `job` is the job as GetJob gave it.
 * @throws JobStateError when the job failed or went on without this party; DppaRpcError; ShareAuthError (after
 *   reporting the sender); EvaluationError from the search; RangeError for bad options.
 */
export async function pushSecure(
  conn: Connection,
  o: PushOptions,
  job: Job,
  scope: CallScope,
  call: PushCallOptions,
): Promise<UploadState> {
  const s = o.secure;
  if (s === undefined || typeof s.workDir !== 'string' || s.workDir === '')
    throw new RangeError(
      `secure.workDir: required, job ${job.id} is secure (the party's private protocol state is kept there)`,
    );
  if (job.privacy !== Privacy.PRIVACY_SECURE) throw new RangeError(`job ${job.id} is not secure`);
  const index = job.parties.findIndex((p) => p.name === o.party) + 1;
  if (index === 0) throw new RangeError(`party: ${o.party} is not a party of job ${job.id}`);
  const progress = (p: SecureProgress): void => call.onSecure?.(p);
  const save = (st: StoredParty): Promise<void> => saveParty(s.workDir, st);
  const stored = await loadParty(s.workDir, job.id, o.party);

  // The delta: a file as given, or pruned into the working folder (kept: the search and the masked vector use it).
  let delta: string;
  if (o.delta !== undefined) {
    checkHeader(await readDeltaHeader(o.delta, { signal: scope.signal }), job, o.delta);
    delta = o.delta;
  } else {
    delta = await keptDelta({ ...o, keepDelta: o.keepDelta ?? join(s.workDir, 'delta.dppa') }, job, scope.signal, (p) =>
      call.onProgress?.({
        phase: 'prepare',
        tensor: p.tensor,
        tensorsDone: p.tensorsDone,
        tensorsTotal: p.tensorsTotal,
        bytesSent: 0,
        attempt: 1,
      }),
    );
  }

  // DPA at the party: its own factors before anything of its values leaves.
  if (stored.factors === undefined) {
    stored.factors = await chooseFactors(o, s, delta, scope.signal, progress);
    await save(stored);
  }
  progress({ step: 'factors', factors: stored.factors });

  // Support: positions only, on the ordinary resumable upload.
  const uploadState = (): Promise<UploadState> => partyUploadState(conn, o, scope);
  let upload = await uploadState();
  if (!upload.complete) {
    if (job.securePhase !== SecurePhase.SECURE_PHASE_SUPPORT) throw excluded(job, o.party, 'support', 'its support');
    const header = supportHeader(await readDeltaHeader(delta, { signal: scope.signal }));
    const source: RecordSource = {
      header,
      records: (skip) => supportRecords(delta, skip, scope.signal),
      close: () => Promise.resolve(),
    };
    upload = await uploadRecords(conn, o, scope, source, upload, uploadState, (p) => call.onProgress?.(p));
  }

  const poll = s.pollMs ?? 1000;
  const secureJob = { jobId: job.id, parties: job.parties.length, threshold: job.threshold };
  // Round 0: keys (made and stored before they are sent).
  if (stored.protocol === undefined) {
    stored.protocol = SecureParty.create(secureJob, index).state;
    await save(stored);
  }
  const party = SecureParty.restore(stored.protocol);
  const persist = async (): Promise<void> => {
    stored.protocol = party.state;
    await save(stored);
  };
  const at = await waitPhase(conn, job.id, SecurePhase.SECURE_PHASE_KEYS, scope, poll, progress);
  if (party.phase === 'roster') {
    if (at.securePhase === SecurePhase.SECURE_PHASE_KEYS) {
      const ad = party.advertise();
      await idempotent(
        inScope(
          conn,
          'AdvertiseKeys',
          conn.secure.advertiseKeys.bind(conn.secure),
          { jobId: job.id, maskPublicKey: ad.maskPublicKey, sharePublicKey: ad.sharePublicKey },
          scope,
          true,
        ),
      );
      progress({ step: 'keys', index });
    }
    // Round 1: shares to every party of the roster.
    await waitPhase(conn, job.id, SecurePhase.SECURE_PHASE_SHARES, scope, poll, progress);
    const roster = await inScope(
      conn,
      'GetRoster',
      conn.secure.getRoster.bind(conn.secure),
      { jobId: job.id },
      scope,
      true,
    );
    const ads: KeyAdvertisement[] = roster.parties.map((a) => ({
      index: a.index,
      maskPublicKey: a.maskPublicKey,
      sharePublicKey: a.sharePublicKey,
    }));
    if (!ads.some((a) => a.index === index))
      throw excluded(await getJob(conn, job.id, scope), o.party, 'keys', 'its keys');
    party.shareKeys(ads);
    await persist();
  }
  if (party.phase === 'shares') {
    const now = await getJob(conn, job.id, scope);
    if (now.securePhase === SecurePhase.SECURE_PHASE_SHARES) {
      const outbox = party.shareKeys(party.state.roster);
      await idempotent(
        inScope(
          conn,
          'SubmitShares',
          conn.secure.submitShares.bind(conn.secure),
          { jobId: job.id, shares: outbox.map((b) => ({ from: b.from, to: b.to, box: b.box })) },
          scope,
          false,
        ),
      );
      progress({ step: 'shares', sent: outbox.length });
    }
    await waitPhase(conn, job.id, SecurePhase.SECURE_PHASE_MASKED_INPUT, scope, poll, progress);
    const got = await inScope(
      conn,
      'GetShares',
      conn.secure.getShares.bind(conn.secure),
      { jobId: job.id },
      scope,
      true,
    );
    if (!got.sharers.includes(index))
      throw excluded(await getJob(conn, job.id, scope), o.party, 'shares', 'its shares');
    try {
      party.receiveShares(got.shares.map((b) => ({ from: b.from, to: b.to, box: b.box })));
    } catch (err) {
      if (err instanceof ShareAuthError)
        await inScope(
          conn,
          'ReportBadShare',
          conn.secure.reportBadShare.bind(conn.secure),
          { jobId: job.id, sender: err.sender },
          scope,
          true,
        ).catch(() => undefined);
      throw err;
    }
    await persist();
    progress({ step: 'received', peers: party.peers });
  }

  // Round 2: the masked vector on U.
  // U is downloaded afresh by each run: a copy an earlier run left (it stopped or crashed) is of no use.
  const unionFile = join(s.workDir, 'union.bin');
  await rm(unionFile, { force: true });
  const factors = stored.factors; // (narrowed here, not in the closure)
  const sendMasked = async (): Promise<void> => {
    const union = await readUnion(conn, job.id, unionFile, scope);
    const total = union.tensors.reduce((n, u) => n + u.count, 0);
    progress({ step: 'union', words: total });
    const fp = fixedPoint(job.clipBound, job.parties.length);
    const scaling = {
      factors,
      weight: s.weight ?? 1,
      outsideByMax: s.outsideByMax ?? false,
    };
    const backoff = conn.backoff();
    for (let attempt = 1; ; attempt++) {
      const st = await maskedState(conn, job.id, scope);
      if (st.complete) break;
      const from = Number(st.wordsHeld);
      if (attempt > 1 && from > 0) backoff.reset();
      const stream = new UploadStream<MaskedChunk, MaskedState>(conn, scope.signal, (cb) =>
        conn.secure.uploadMasked(conn.metadata(), {}, cb),
      );
      try {
        let sent = from;
        let clipped = 0;
        for await (const c of maskedChunks(party, fp, union, scaledTensors(delta, scaling, scope.signal), {
          from,
          signal: scope.signal,
          onClipped: (n) => (clipped += n),
        })) {
          const words = Buffer.from(c.words.buffer, c.words.byteOffset, c.words.byteLength);
          const ok = await stream.write({
            jobId: job.id,
            offset: BigInt(c.offset),
            words,
            crc32c: c.crc32c,
            totalWords: BigInt(total),
            // The whole vector's count, on the chunk that ends it (the server publishes the sum over U3).
            clipped: BigInt(c.offset + c.words.length === total ? clipped : 0),
          });
          if (!ok) break;
          sent = c.offset + c.words.length;
          progress({ step: 'masked', wordsSent: sent, wordsTotal: total, attempt });
        }
        if (from === total) {
          // The server holds the whole vector but has not recorded it (its record failed): an empty chunk at |U|
          // makes it record it (an empty stream would not reach the job at all).
          const empty = new Uint8Array(0);
          await stream.write({
            jobId: job.id,
            offset: BigInt(total),
            words: empty,
            crc32c: crc32c(empty),
            totalWords: BigInt(total),
            clipped: BigInt(clipped),
          });
        }
        stored.clipped = clipped;
        const result = await stream.finish();
        if (result.complete) break;
        // Not recorded yet: wait before asking again, within the retry budget.
        await backoff.failed(
          new Error(
            `UploadMasked: the server holds ${result.wordsHeld} of ${total} words and did not record the vector`,
          ),
          scope.signal,
        );
      } catch (err) {
        const e = DppaRpcError.from(scope.reason(err), 'UploadMasked');
        // ALREADY_EXISTS: another stream of the party is open (on this server or, a cluster's, another replica);
        // ABORTED: this stream's claim lapsed and another replica took it over. Both: wait and resume.
        const retried = e instanceof DppaRpcError && (e.code === Status.ALREADY_EXISTS || e.code === Status.ABORTED);
        if (scope.signal.aborted || !(isTransient(e) || retried)) throw e;
        await backoff.failed(e, scope.signal);
      } finally {
        stream.close();
      }
    }
    // Complete before this run coded a word (an earlier run stopped before saving): the count, nothing sent.
    if (stored.clipped === undefined) {
      let clipped = 0;
      const none = maskedChunks(party, fp, union, scaledTensors(delta, scaling, scope.signal), {
        from: total,
        signal: scope.signal,
        onClipped: (n) => (clipped += n),
      });
      for await (const c of none) throw new Error(`masked vector: a chunk at ${c.offset} past its ${total} words`);
      stored.clipped = clipped;
    }
    stored.maskedComplete = true;
    await save(stored);
    progress({ step: 'maskedComplete', wordsTotal: total, clipped: stored.clipped });
  };
  if (party.phase === 'input' && stored.maskedComplete !== true) {
    const held = await maskedState(conn, job.id, scope);
    if (held.complete) {
      // An earlier run sent the whole vector and stopped before saving so: nothing to download or send.
      stored.maskedComplete = true;
      await save(stored);
      progress({ step: 'maskedComplete', wordsTotal: Number(held.wordsExpected), clipped: stored.clipped });
    } else
      try {
        await sendMasked();
      } finally {
        // On success and on any exit from here (an error, exclusion, abort): U is not kept.
        await rm(unionFile, { force: true }).catch(() => undefined);
      }
  }

  // Round 3: unmask.
  if (party.phase === 'input' || party.phase === 'done') {
    const now = await waitPhase(conn, job.id, SecurePhase.SECURE_PHASE_UNMASK, scope, poll, progress);
    if (now.securePhase === SecurePhase.SECURE_PHASE_UNMASK) {
      const req = await inScope(
        conn,
        'GetUnmaskRequest',
        conn.secure.getUnmaskRequest.bind(conn.secure),
        { jobId: job.id },
        scope,
        true,
      );
      if (!req.survivors.includes(index)) throw excluded(now, o.party, 'masked input', 'its masked vector');
      const answer = party.unmask({ survivors: req.survivors, dropouts: req.dropouts });
      await persist();
      await idempotent(
        inScope(
          conn,
          'SubmitUnmask',
          conn.secure.submitUnmask.bind(conn.secure),
          { jobId: job.id, selfSeedShares: answer.selfSeedShares, maskKeyShares: answer.maskKeyShares },
          scope,
          false,
        ),
      );
      progress({ step: 'unmasked', survivors: req.survivors, dropouts: req.dropouts });
    }
  }
  return upload;
}

/** The factors: given, searched with the party's evaluation, or 1. */
async function chooseFactors(
  o: PushOptions,
  s: SecurePushOptions,
  delta: string,
  signal: AbortSignal,
  progress: (p: SecureProgress) => void,
): Promise<number[]> {
  const partitions = (await readDeltaHeader(delta, { signal })).levels.length;
  if (s.factors !== undefined) {
    if (s.factors.length !== partitions || s.factors.some((f) => !Number.isFinite(f)))
      throw new RangeError(`secure.factors: ${partitions} finite factor(s) expected (one per partition of ${delta})`);
    return [...s.factors];
  }
  if (s.evaluate === undefined) return Array.from({ length: partitions }, () => 1);
  const base = o.base ?? s.base;
  const finetuned = o.finetuned ?? s.finetuned;
  if (base === undefined || finetuned === undefined)
    throw new RangeError('secure.base and secure.finetuned: required to search the factors of a pushed .dppa file');
  const result = await searchLocally({
    base,
    finetuned,
    delta,
    workDir: s.workDir,
    evaluate: s.evaluate,
    search: s.search ?? {},
    outsideByMax: s.outsideByMax ?? false,
    ...(s.retries === undefined ? {} : { retries: s.retries }),
    signal,
    onProgress: (event) => progress({ step: 'search', event }),
  });
  progress({ step: 'factors', factors: result.factors, domainRatio: result.domainRatio });
  return result.factors;
}

function getJob(conn: Connection, jobId: string, scope: CallScope): Promise<Job> {
  return inScope(conn, 'GetJob', conn.jobs.getJob.bind(conn.jobs), { jobId }, scope, true);
}

function maskedState(conn: Connection, jobId: string, scope: CallScope): Promise<MaskedState> {
  return inScope(conn, 'GetMaskedState', conn.secure.getMaskedState.bind(conn.secure), { jobId }, scope, true);
}

/** A repeated submission is no failure: the server has it (the party's answers do not change). */
async function idempotent(p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch (err) {
    if (err instanceof DppaRpcError && err.code === Status.ALREADY_EXISTS) return;
    throw err;
  }
}

/**
 * Polls GetJob until the job's secure phase is at least `phase` (or the job merged or failed).
 * @throws JobStateError when the job failed.
 */
async function waitPhase(
  conn: Connection,
  jobId: string,
  phase: SecurePhase,
  scope: CallScope,
  pollMs: number,
  progress: (p: SecureProgress) => void,
): Promise<Job> {
  let told: SecurePhase | undefined;
  for (;;) {
    const job = await getJob(conn, jobId, scope);
    if (job.state === JobState.JOB_STATE_FAILED)
      throw new JobStateError(job.id, jobStateName(job.state), `job ${job.id} failed: ${job.failureReason}`);
    if (job.securePhase >= phase || job.state === JobState.JOB_STATE_MERGED) return job;
    if (job.securePhase !== told) {
      told = job.securePhase;
      progress({ step: 'waiting', phase: securePhaseName(job.securePhase) });
    }
    await sleep(pollMs, scope.signal);
  }
}

/** The job went on without this party. */
function excluded(job: Job, party: string, phase: string, what: string): JobStateError {
  return new JobStateError(
    job.id,
    jobStateName(job.state),
    `job ${job.id} closed its ${phase} phase without ${what} from party ${party} (now ${securePhaseName(job.securePhase)}${job.state === JobState.JOB_STATE_FAILED ? `, failed: ${job.failureReason}` : ''}): the sum goes on without this party`,
  );
}

/**
 * The union U, streamed tensor by tensor in the base checkpoint's order (the delta's) into `path` (see
 * {@link spoolUnion}): what is held in memory is one chunk of positions at a time.
 * @throws DppaRpcError; FormatError for a damaged chunk; Error when the stream's offsets do not add up.
 */
async function readUnion(conn: Connection, jobId: string, path: string, scope: CallScope): Promise<PartyUnion> {
  const backoff = conn.backoff();
  for (;;) {
    try {
      let offset = 0;
      let size = -1;
      const stream = conn.secure.getSupport({ jobId }, conn.metadata());
      async function* pieces(): AsyncGenerator<UnionPiece> {
        for await (const msg of readStream<SupportChunk>(stream, scope.signal)) {
          const chunk = msg.chunk;
          if (chunk === undefined) throw new Error('GetSupport: a message without its chunk');
          if (Number(msg.unionOffset) !== offset)
            throw new Error(`GetSupport: chunk at union offset ${msg.unionOffset}, expected ${offset}`);
          size = Number(msg.unionSize);
          const decoded = decodeChunk(chunk, { numel: Number(msg.tensorSize) });
          yield { tensor: chunk.tensor, positions: decoded.positions };
          offset += decoded.count;
        }
      }
      const union = await spoolUnion(path, pieces());
      if (size >= 0 && offset !== size)
        throw new Error(`GetSupport: ${offset} positions received, the union has ${size}`);
      return union;
    } catch (err) {
      const e = DppaRpcError.from(scope.reason(err), 'GetSupport');
      if (scope.signal.aborted || !isTransient(e)) throw e;
      await backoff.failed(e, scope.signal);
    }
  }
}
