/**
 * The server's side of secure jobs: each accepted protocol message goes through the job store (the
 * SecureAggregator's state is saved with the job record: job.json embedded, the KV entry on a cluster); phases close
 * when every party waited for answered or at the job's per-phase deadline (`advance`, called by the job runner).
 * docs/privacy.md, "Wiring".
 */
import { randomUUID } from 'node:crypto';
import { SecurePhase, securePhaseToJSON } from '../../proto/gen/dppa/v1/jobs.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import {
  fixedPoint,
  ProtocolStateError,
  TooFewSurvivorsError,
  type EncryptedShare,
  type KeyAdvertisement,
  type UnmaskRequest,
  type UnmaskResponse,
} from '../../proto/secure/index.js';
import { AbortedError, AlreadyExistsError, FailedPreconditionError } from '../errors.js';
import type { JobEvents } from '../jobs/job-events.js';
import { isTerminal, stateName, type JobStore, type StoredJob } from '../jobs/job-store.js';
import { StateConflictError } from '../jobs/job-transitions.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { appendMasked, maskedClipped, maskedWordsHeld, type MaskedPiece } from '../uploads/masked-spool.js';
import type { Spool } from '../uploads/spool.js';
import { loadAggregator, partyIndex, phaseOf, saveAggregator, setPhase, type SecureRecord } from './secure-record.js';
import { writeSum } from './secure-sum.js';
import { buildUnion, readUnion, type Union } from './union.js';

/** Dependencies of {@link SecureJobs}. */
export interface SecureJobsDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  metrics: Metrics;
  log: Logger;
  /** Asks the job runner to look at the job again (a message arrived, a deadline passed). */
  poke: (jobId: string) => void;
  /** The lease of a masked-upload claim on a store shared by replicas, ms (tests shorten it). @default 60000 */
  maskedLeaseMs?: number | undefined;
  /** Awaited before a replica claims the closing of SUPPORT or UNMASK (tests make replicas race there). @default none */
  beforeCloseClaim?: ((jobId: string, phase: ClosingPhase) => Promise<void>) | undefined;
}

/** The phases whose closing writes files (the union, the sum), so that replicas claim it first. */
export type ClosingPhase = 'SUPPORT' | 'UNMASK';

/** Longest grace period a phase open across a restart gets after the server starts. */
const RESTART_GRACE_MS = 60_000;

/** How long a replica's claim to close a phase keeps the others away (then a crashed replica's closing is redone). */
const CLOSE_LEASE_MS = 10 * 60_000;

/**
 * How long a replica's claim on a party's masked upload keeps the other replicas' streams for that party away; the
 * stream renews it once half of it has passed, before its next write (a replica that died frees it after this).
 */
const MASKED_LEASE_MS = 60_000;

/** Longest wait of a timer (setTimeout fires at once beyond 2^31 - 1 ms). */
const MAX_TIMER_MS = 2 ** 31 - 1;

const PHASE_LABEL: Partial<Record<SecurePhase, string>> = {
  [SecurePhase.SECURE_PHASE_SUPPORT]: 'support',
  [SecurePhase.SECURE_PHASE_KEYS]: 'keys',
  [SecurePhase.SECURE_PHASE_SHARES]: 'shares',
  [SecurePhase.SECURE_PHASE_MASKED_INPUT]: 'masked_input',
  [SecurePhase.SECURE_PHASE_UNMASK]: 'unmask',
};

function secureOf(job: StoredJob): SecureRecord {
  if (job.secure === undefined) throw new FailedPreconditionError(`job ${job.id} is not a secure job`);
  return job.secure;
}

/** The base checkpoint's tensor names in its order (that of every delta and of U). */
async function tensorOrder(basePath: string): Promise<string[]> {
  const base = await Checkpoint.open(basePath);
  try {
    return base.tensors().map((t) => t.name);
  } finally {
    await base.close();
  }
}

/** Parties a protocol phase (KEYS onwards) waits for, and those whose message the record holds (names). */
function messagesIn(job: StoredJob, r: SecureRecord, phase: SecurePhase): { waited: string[]; answered: string[] } {
  const name = (i: number): string => job.parties[i - 1]!.name;
  const s = loadAggregator(r).state;
  switch (phase) {
    case SecurePhase.SECURE_PHASE_KEYS:
      return { waited: r.supporters, answered: s.roster.map((a) => name(a.index)) };
    case SecurePhase.SECURE_PHASE_SHARES:
      return { waited: s.roster.map((a) => name(a.index)), answered: s.sharers.map(name) };
    case SecurePhase.SECURE_PHASE_MASKED_INPUT:
      return { waited: s.sharers.map(name), answered: s.survivors.map(name) };
    default:
      return { waited: s.request!.survivors.map(name), answered: s.responses.map((x) => name(x.from)) };
  }
}

/** This server's claim on a party's masked upload (a store shared by replicas). */
interface MaskedClaim {
  id: string;
  /** When it is renewed, on this server's monotonic clock (`performance.now()`). */
  renewAt: number;
}

/** Thrown by a release's change to give up without a write: the claim is no longer there. */
class ClaimGone extends Error {}

function phaseName(p: SecurePhase): string {
  return securePhaseToJSON(p).replace(/^SECURE_PHASE_/, '');
}

/** `p` as a {@link ClosingPhase}; undefined for a phase whose closing writes nothing. */
function closingPhase(p: SecurePhase): ClosingPhase | undefined {
  if (p === SecurePhase.SECURE_PHASE_SUPPORT) return 'SUPPORT';
  if (p === SecurePhase.SECURE_PHASE_UNMASK) return 'UNMASK';
  return undefined;
}

/** Secure jobs of this server. */
export class SecureJobs {
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private readonly unions = new Map<string, Union>();
  /** `<job>/<party>` of the masked uploads open here. */
  private readonly maskedStreams = new Set<string>();
  /** When this server started: a phase open across a restart gets a grace period after it. */
  private readonly startedAt = Date.now();
  /** See {@link SecureJobsDeps.maskedLeaseMs}. */
  private readonly maskedLeaseMs: number;

  constructor(private readonly deps: SecureJobsDeps) {
    this.maskedLeaseMs = deps.maskedLeaseMs ?? MASKED_LEASE_MS;
  }

  /** Drops what this server keeps for a job that ended (merged, failed, cancelled): its timer and cached union. */
  forget(jobId: string): void {
    this.clearTimer(jobId);
    this.unions.delete(jobId);
  }

  /** Stops the deadline timers. */
  stop(): void {
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
  }

  /** The secure job and the caller's index; the phase is checked by {@link accept} on the stored record. */
  private expect(jobId: string, party: string): { job: StoredJob; index: number } {
    const job = this.deps.store.get(jobId);
    secureOf(job);
    return { job, index: partyIndex(job.parties, party) };
  }

  /** The job as stored now (a replica's copy may lag), checked to be collecting `phase`. */
  private async current(jobId: string, phase: SecurePhase): Promise<StoredJob> {
    const { store } = this.deps;
    const job = store.fresh === undefined ? store.get(jobId) : await store.fresh(jobId);
    const now = phaseOf(secureOf(job));
    if (now !== phase)
      throw new FailedPreconditionError(`job ${jobId} is collecting ${phaseName(now)}, not ${phaseName(phase)}`);
    return job;
  }

  /** Applies an accepted message to the stored aggregator (checked before anything changes). */
  private async accept(jobId: string, phase: SecurePhase, apply: (r: SecureRecord) => void): Promise<StoredJob> {
    const job = await this.deps.store.update(jobId, (j) => {
      const r = secureOf(j);
      if (phaseOf(r) !== phase)
        throw new FailedPreconditionError(
          `job ${jobId} is collecting ${phaseName(phaseOf(r))}, not ${phaseName(phase)}`,
        );
      apply(r);
    });
    this.deps.poke(jobId);
    return job;
  }

  /** AdvertiseKeys. */
  async advertise(
    jobId: string,
    party: string,
    ad: Omit<KeyAdvertisement, 'index'>,
  ): Promise<{ index: number; parties: number }> {
    const { job, index } = this.expect(jobId, party);
    await this.accept(jobId, SecurePhase.SECURE_PHASE_KEYS, (r) => {
      if (!r.supporters.includes(party))
        throw new FailedPreconditionError(
          `party ${party}: its support is not in the union (it did not upload one in time)`,
        );
      const agg = loadAggregator(r);
      agg.advertise({ index, ...ad });
      saveAggregator(r, agg);
    });
    this.deps.metrics.secureBytes.inc({ phase: 'keys' }, ad.maskPublicKey.length + ad.sharePublicKey.length);
    return { index, parties: job.parties.length };
  }

  /** GetRoster: U1 with party names, once KEYS closed. */
  roster(jobId: string): {
    parties: (KeyAdvertisement & { partyId: string })[];
    threshold: number;
    phase: SecurePhase;
    partyCount: number;
  } {
    const job = this.deps.store.get(jobId);
    const r = secureOf(job);
    const phase = phaseOf(r);
    const closed = phase > SecurePhase.SECURE_PHASE_KEYS;
    const roster = closed ? loadAggregator(r).state.roster : [];
    return {
      parties: roster.map((a) => ({ ...a, partyId: job.parties[a.index - 1]!.name })),
      threshold: r.threshold,
      phase,
      partyCount: job.parties.length,
    };
  }

  /** SubmitShares. */
  async submitShares(jobId: string, party: string, shares: EncryptedShare[]): Promise<number> {
    const { index } = this.expect(jobId, party);
    let sharers = 0;
    await this.accept(jobId, SecurePhase.SECURE_PHASE_SHARES, (r) => {
      const agg = loadAggregator(r);
      agg.submitShares(index, shares);
      saveAggregator(r, agg);
      sharers = agg.state.sharers.length;
    });
    this.deps.metrics.secureBytes.inc(
      { phase: 'shares' },
      shares.reduce((n, s) => n + s.box.length, 0),
    );
    return sharers;
  }

  /** GetShares: the caller's boxes from U2, once SHARES closed. */
  shares(jobId: string, party: string): { shares: EncryptedShare[]; phase: SecurePhase; sharers: number[] } {
    const job = this.deps.store.get(jobId);
    const r = secureOf(job);
    const phase = phaseOf(r);
    if (phase <= SecurePhase.SECURE_PHASE_SHARES) return { shares: [], phase, sharers: [] };
    const agg = loadAggregator(r);
    return { shares: agg.sharesFor(partyIndex(job.parties, party)), phase, sharers: [...agg.state.sharers] };
  }

  /** U, once SUPPORT closed. */
  async union(jobId: string): Promise<Union> {
    const job = this.deps.store.get(jobId);
    const r = secureOf(job);
    if (phaseOf(r) === SecurePhase.SECURE_PHASE_SUPPORT)
      throw new FailedPreconditionError(`job ${jobId} is still collecting supports: the union is not known yet`);
    let u = this.unions.get(jobId);
    if (u === undefined) {
      u = await readUnion(this.deps.store.dir(jobId));
      this.unions.set(jobId, u);
    }
    return u;
  }

  /** GetMaskedState; records a whole vector whose party is not yet in U3 (see {@link recordWhole}). */
  async maskedState(
    jobId: string,
    party: string,
  ): Promise<{ wordsHeld: number; wordsExpected: number; complete: boolean }> {
    const job = this.deps.store.get(jobId);
    const r = secureOf(job);
    const held = await maskedWordsHeld(this.deps.store.dir(jobId), party);
    const index = partyIndex(job.parties, party);
    let complete = loadAggregator(r).state.survivors.includes(index);
    if (!complete && held === r.unionSize && r.unionSize > 0) complete = await this.recordWhole(job, index);
    return { wordsHeld: held, wordsExpected: r.unionSize, complete };
  }

  /**
   * Puts a sharer whose file holds all |U| words in U3 (also the repair of an accepted upload whose store update
   * failed: the file is whole, the party is not a survivor). False when the phase is over or the party did not share.
   */
  private async recordWhole(job: StoredJob, index: number): Promise<boolean> {
    const r = secureOf(job);
    if (phaseOf(r) !== SecurePhase.SECURE_PHASE_MASKED_INPUT || !loadAggregator(r).state.sharers.includes(index))
      return false;
    await this.recordMasked(job.id, index, job.parties[index - 1]!.name);
    return true;
  }

  /**
   * Records party `index`'s whole masked vector (accept re-checks the phase), with the clipped count kept beside
   * the file (the same on a repair after a lost record or a restart as on the stream that completed it).
   */
  private async recordMasked(jobId: string, index: number, party: string): Promise<void> {
    const count = await maskedClipped(this.deps.store.dir(jobId), party);
    await this.accept(jobId, SecurePhase.SECURE_PHASE_MASKED_INPUT, (rec) => {
      const a = loadAggregator(rec);
      if (!a.state.survivors.includes(index)) {
        a.recordMasked(index, rec.unionSize);
        if (count > 0) rec.clipped = { ...rec.clipped, [party]: count };
      }
      saveAggregator(rec, a);
    });
  }

  /** UploadMasked: appends the chunks; a whole vector puts the caller in U3. */
  async receiveMasked(
    jobId: string,
    party: string,
    pieces: AsyncIterable<MaskedPiece>,
  ): Promise<{ wordsHeld: number; wordsExpected: number; complete: boolean }> {
    // Files are written before the record: the phase is checked on the job as stored.
    const job = await this.current(jobId, SecurePhase.SECURE_PHASE_MASKED_INPUT);
    const index = partyIndex(job.parties, party);
    const r = job.secure!;
    const agg = loadAggregator(r);
    if (!agg.state.sharers.includes(index))
      throw new ProtocolStateError(`party ${party} did not share its keys in time: its masked input cannot be used`);
    if (agg.state.survivors.includes(index))
      return { wordsHeld: r.unionSize, wordsExpected: r.unionSize, complete: true };
    // One stream per party at a time on this server: two would write to one file.
    const key = `${jobId}/${party}`;
    if (this.maskedStreams.has(key))
      throw new AlreadyExistsError(`party ${party} already has a masked upload open: wait for it to end, then resume`);
    this.maskedStreams.add(key);
    let held: number;
    let claim: MaskedClaim | undefined;
    try {
      // And on replicas sharing the store, one server at a time: a claim in the job record, renewed before writes.
      claim = await this.claimMasked(jobId, party);
      const renew = async (): Promise<void> => {
        if (claim !== undefined && performance.now() >= claim.renewAt)
          claim.renewAt = await this.leaseMasked(jobId, party, claim.id, false);
      };
      const renewing = (async function* (): AsyncGenerator<MaskedPiece> {
        for await (const p of pieces) {
          await renew();
          yield p;
        }
      })();
      const dir = this.deps.store.dir(jobId);
      // A whole vector from an earlier stream whose record failed: record it now.
      if ((await maskedWordsHeld(dir, party)) === r.unionSize) {
        await this.recordMasked(jobId, index, party);
        return { wordsHeld: r.unionSize, wordsExpected: r.unionSize, complete: true };
      }
      // The clipped count the party reports on the chunk that ends its vector is kept beside the file.
      held = await appendMasked(dir, party, r.unionSize, renewing, (n) =>
        this.deps.metrics.secureBytes.inc({ phase: 'masked_input' }, n),
      );
      if (held === r.unionSize) await this.recordMasked(jobId, index, party);
    } finally {
      this.maskedStreams.delete(key);
      if (claim !== undefined) await this.releaseMasked(jobId, party, claim.id);
    }
    return { wordsHeld: held, wordsExpected: r.unionSize, complete: held === r.unionSize };
  }

  /**
   * On a store shared by replicas, claims the writing of `party`'s masked vector for this server (see
   * {@link leaseMasked}); undefined on a store of one server (its own set of open streams suffices).
   */
  private async claimMasked(jobId: string, party: string): Promise<MaskedClaim | undefined> {
    if (this.deps.store.fresh === undefined) return undefined;
    const id = randomUUID();
    return { id, renewAt: await this.leaseMasked(jobId, party, id, true) };
  }

  /**
   * Takes (`take`) or renews the claim `id` on `party`'s masked upload for the lease ({@link MASKED_LEASE_MS}), by
   * compare-and-swap through the store, while MASKED_INPUT is collected and the job has not ended.
   * @returns When to renew it: half a lease after the update began, on the monotonic clock (`until`, in the record
   *   for the other replicas, is on the wall clock).
   * @throws AlreadyExistsError when another server's claim is current (the party waits and resumes, as for a second
   *   stream on one server); AbortedError when this claim was lost (it lapsed and another server took it);
   *   FailedPreconditionError when the phase closed or the job ended (merged, failed).
   */
  private async leaseMasked(jobId: string, party: string, id: string, take: boolean): Promise<number> {
    const phase = SecurePhase.SECURE_PHASE_MASKED_INPUT;
    const lease = this.maskedLeaseMs;
    const started = performance.now();
    await this.deps.store.update(jobId, (j) => {
      // The job's state as the store holds it (the same for every replica): a stream started after the job ended
      // (and its masked vectors were deleted, maybe by another replica) does not get to write.
      if (isTerminal(j.state))
        throw new FailedPreconditionError(`job ${jobId} is ${stateName(j.state)}: no masked upload is taken`);
      const r = secureOf(j);
      if (phaseOf(r) !== phase)
        throw new FailedPreconditionError(
          `job ${jobId} is collecting ${phaseName(phaseOf(r))}, not ${phaseName(phase)}`,
        );
      const c = r.maskedClaims?.[party];
      if (take && c !== undefined && c.id !== id && Date.parse(c.until) > Date.now())
        throw new AlreadyExistsError(
          `party ${party} already has a masked upload open on another server: wait for it to end, then resume`,
        );
      if (!take && c?.id !== id)
        throw new AbortedError(
          `party ${party}: another server took over its masked upload (this stream's claim lapsed): resume`,
        );
      r.maskedClaims = { ...r.maskedClaims, [party]: { id, until: new Date(Date.now() + lease).toISOString() } };
    });
    return started + lease / 2;
  }

  /** Gives the claim `id` on `party`'s masked upload up (see {@link release}). */
  private releaseMasked(jobId: string, party: string, id: string): Promise<void> {
    return this.release(jobId, 'on a masked upload', { party }, (r) => {
      if (r.maskedClaims?.[party]?.id !== id) throw new ClaimGone();
      const rest = { ...r.maskedClaims };
      delete rest[party];
      r.maskedClaims = rest;
    });
  }

  /**
   * Gives a claim up by `drop`, which throws ClaimGone when the claim is no longer this server's (then nothing is
   * written); logged, not thrown: a claim left behind lapses.
   */
  private async release(
    jobId: string,
    what: string,
    fields: Record<string, string>,
    drop: (r: SecureRecord) => void,
  ): Promise<void> {
    try {
      await this.deps.store.update(jobId, (j) => drop(secureOf(j)));
    } catch (err) {
      if (err instanceof ClaimGone) return;
      this.deps.log.warn(`could not release the claim ${what}; it lapses`, { jobId, ...fields, err });
    }
  }

  /** GetUnmaskRequest, once MASKED_INPUT closed. */
  unmaskRequest(jobId: string): UnmaskRequest & { phase: SecurePhase } {
    const r = secureOf(this.deps.store.get(jobId));
    const phase = phaseOf(r);
    const req = phase > SecurePhase.SECURE_PHASE_MASKED_INPUT ? loadAggregator(r).state.request : undefined;
    return { survivors: [...(req?.survivors ?? [])], dropouts: [...(req?.dropouts ?? [])], phase };
  }

  /** SubmitUnmask. */
  async submitUnmask(jobId: string, party: string, res: Omit<UnmaskResponse, 'from'>): Promise<number> {
    const { index } = this.expect(jobId, party);
    let n = 0;
    await this.accept(jobId, SecurePhase.SECURE_PHASE_UNMASK, (r) => {
      const agg = loadAggregator(r);
      agg.submitUnmask({ from: index, ...res });
      saveAggregator(r, agg);
      n = agg.state.responses.length;
    });
    const bytes = [...res.selfSeedShares, ...res.maskKeyShares].reduce((s, x) => s + x.y.length, 0);
    this.deps.metrics.secureBytes.inc({ phase: 'unmask' }, bytes);
    return n;
  }

  /** ReportBadShare: logged. */
  reportBadShare(jobId: string, party: string, sender: number): void {
    secureOf(this.deps.store.get(jobId));
    this.deps.log.warn('a party reports a share box that failed authentication', { jobId, party, sender });
  }

  /**
   * Closes the open phase if it can close (everyone answered, or its deadline passed), as many phases as can.
   * @returns True once the masks are removed and the sum written (the job can merge).
   * @throws TooFewSurvivorsError (the job must fail, nothing written) and InconsistentSharesError.
   */
  async advance(jobId: string, signal: AbortSignal): Promise<boolean> {
    for (;;) {
      const job = this.deps.store.get(jobId);
      const r = secureOf(job);
      const phase = phaseOf(r);
      if (phase === SecurePhase.SECURE_PHASE_DONE) {
        this.clearTimer(jobId);
        return true;
      }
      const { waited, answered } = await this.progress(job, r, phase);
      const deadline = this.deadline(r);
      const everyone = waited.every((p) => answered.includes(p));
      if (!everyone && Date.now() < deadline) {
        this.schedule(jobId, deadline);
        return false;
      }
      signal.throwIfAborted();
      await this.close(
        job,
        r,
        phase,
        answered,
        waited.filter((p) => !answered.includes(p)),
        signal,
      );
    }
  }

  /**
   * When the open phase closes without the parties that have not answered: its opening plus the job's phase
   * seconds, but not before a grace period (the phase seconds, at most 60 s) after this server started, so that
   * the time the server was down does not count against the parties.
   */
  private deadline(r: SecureRecord): number {
    const T = r.phaseSeconds * 1000;
    return Math.max(Date.parse(r.phaseSince) + T, this.startedAt + Math.min(T, RESTART_GRACE_MS));
  }

  /** Parties the phase waits for, and those that answered (names). */
  private async progress(
    job: StoredJob,
    r: SecureRecord,
    phase: SecurePhase,
  ): Promise<{ waited: string[]; answered: string[] }> {
    if (phase !== SecurePhase.SECURE_PHASE_SUPPORT) return messagesIn(job, r, phase);
    const spools = await this.deps.spool.ofJob(job.id);
    return {
      waited: job.parties.map((p) => p.name),
      answered: [...spools].filter(([, sp]) => sp.complete).map(([n]) => n),
    };
  }

  /** Closes `phase`, under a claim on a store shared by replicas ({@link claim}), given up if the closing fails. */
  private async close(
    job: StoredJob,
    r: SecureRecord,
    phase: SecurePhase,
    answered: string[],
    missing: string[],
    signal: AbortSignal,
  ): Promise<void> {
    const claim = await this.claim(job.id, phase);
    try {
      await this.closeClaimed(job, r, phase, answered, missing, signal, claim);
    } catch (err) {
      // Otherwise the closing's next attempt, on this replica as on another, would wait for the claim's lease.
      if (claim !== undefined)
        await this.release(job.id, 'to close a secure phase', { phase: phaseName(phase) }, (rec) => {
          if (rec.closing?.id !== claim) throw new ClaimGone();
          delete rec.closing;
        });
      throw err;
    }
  }

  private async closeClaimed(
    job: StoredJob,
    r: SecureRecord,
    phase: SecurePhase,
    answered: string[],
    missing: string[],
    signal: AbortSignal,
    claim: string | undefined,
  ): Promise<void> {
    const { store, metrics, events } = this.deps;
    const dir = store.dir(job.id);
    const next = (phase + 1) as SecurePhase;
    let unionSize = r.unionSize;
    let built: Union | undefined;
    let change: (rec: SecureRecord) => void;
    switch (phase) {
      case SecurePhase.SECURE_PHASE_SUPPORT: {
        if (answered.length < r.threshold) throw new TooFewSurvivorsError('support', answered.length, r.threshold);
        const spools = await this.deps.spool.ofJob(job.id);
        const files = answered.map((p) =>
          [...spools.get(p)!.held.values()].map((t) => ({ name: t.name, file: t.file })),
        );
        // The claim is checked again before union.bin replaces what is there (a build may outlast the lease).
        const union = await buildUnion(dir, files, await tensorOrder(job.basePath), () =>
          this.checkClaim(job.id, phase, claim),
        );
        built = union;
        unionSize = union.size;
        change = (rec) => {
          rec.unionSize = union.size;
          rec.supporters = [...answered];
        };
        break;
      }
      case SecurePhase.SECURE_PHASE_KEYS:
        change = (rec) => {
          const agg = loadAggregator(rec);
          agg.closeKeys();
          saveAggregator(rec, agg);
        };
        break;
      case SecurePhase.SECURE_PHASE_SHARES:
        change = (rec) => {
          const agg = loadAggregator(rec);
          agg.closeShares(rec.unionSize, { spooled: true });
          saveAggregator(rec, agg);
        };
        break;
      case SecurePhase.SECURE_PHASE_MASKED_INPUT:
        change = (rec) => {
          const agg = loadAggregator(rec);
          agg.closeMasked();
          saveAggregator(rec, agg);
        };
        break;
      default: {
        // UNMASK: the heavy part runs outside the store update; a restart redoes it from the spool.
        const agg = loadAggregator(r);
        const removal = agg.maskRemoval();
        const union = await this.union(job.id);
        const survivors = agg.state.request!.survivors.map((i) => job.parties[i - 1]!.name);
        const fp = fixedPoint(r.clipBound, job.parties.length);
        await writeSum(dir, union, survivors, removal, fp, job.baseFingerprint, signal);
        change = (rec) => {
          const a = loadAggregator(rec);
          a.complete();
          saveAggregator(rec, a);
        };
      }
    }
    const seconds = (Date.now() - Date.parse(r.phaseSince)) / 1000;
    let clipped = 0;
    try {
      await store.update(job.id, (j) => {
        const rec = secureOf(j);
        if (phaseOf(rec) !== phase) throw new StateConflictError(`job ${job.id} left ${phaseName(phase)} meanwhile`);
        if (claim !== undefined && rec.closing?.id !== claim)
          throw new StateConflictError(`job ${job.id}: another server took over closing ${phaseName(phase)}`);
        delete rec.closing;
        if (phase === SecurePhase.SECURE_PHASE_MASKED_INPUT) delete rec.maskedClaims;
        if (phase !== SecurePhase.SECURE_PHASE_SUPPORT) {
          // Messages accepted since the snapshot count: the event tells what the committed record holds.
          const now = messagesIn(j, rec, phase);
          answered = now.answered;
          missing = now.waited.filter((p) => !answered.includes(p));
        }
        // The counts of U3 as the committed record holds them.
        if (phase === SecurePhase.SECURE_PHASE_MASKED_INPUT)
          clipped = answered.reduce((n, p) => n + (rec.clipped?.[p] ?? 0), 0);
        change(rec);
        setPhase(rec, next);
      });
    } catch (err) {
      // Another replica may have built (and renamed) its own union.bin meanwhile: read U again from the folder.
      if (err instanceof StateConflictError) this.unions.delete(job.id);
      throw err;
    }
    // Cached only once the phase committed with this build: its tensor list matches the union.bin it renamed.
    if (built !== undefined) this.unions.set(job.id, built);
    metrics.securePhaseSeconds.observe({ phase: PHASE_LABEL[phase]! }, seconds);
    if (clipped > 0) metrics.secureClipped.inc(clipped);
    await events.append(job.id, {
      securePhaseClosed: {
        phase,
        next,
        parties: answered.length,
        missing,
        unionSize: BigInt(unionSize),
        seconds,
        clipped: BigInt(clipped),
      },
    });
    this.deps.log.info('secure phase closed', {
      jobId: job.id,
      phase: phaseName(phase),
      parties: answered.length,
      missing,
      ...(clipped > 0 ? { clipped } : {}),
    });
  }

  /**
   * On a store shared by replicas, claims the closing of `phase` before anything is written (the union, the sum):
   * each replica sweeps and arms its own deadline, and two closings would write two unions. The claim is a lease
   * ({@link CLOSE_LEASE_MS}), taken by compare-and-swap through the store; the closing commits only while it holds it.
   * @returns The claim's id; undefined on a store of one server or for a phase that writes nothing.
   * @throws StateConflictError when another replica holds the claim or the phase closed meanwhile.
   */
  private async claim(jobId: string, phase: SecurePhase): Promise<string | undefined> {
    const closing = closingPhase(phase);
    if (this.deps.store.fresh === undefined || closing === undefined) return undefined;
    await this.deps.beforeCloseClaim?.(jobId, closing);
    const id = randomUUID();
    let until = '';
    await this.deps.store.update(jobId, (j) => {
      const rec = secureOf(j);
      if (phaseOf(rec) !== phase) throw new StateConflictError(`job ${jobId} left ${phaseName(phase)} meanwhile`);
      const c = rec.closing;
      if (c !== undefined && c.phase === rec.phase && Date.parse(c.until) > Date.now()) {
        this.deps.log.debug('secure phase left to the server that claimed its closing', {
          jobId,
          phase: phaseName(phase),
          until: c.until,
        });
        throw new StateConflictError(`job ${jobId}: another server is closing ${phaseName(phase)}`);
      }
      until = new Date(Date.now() + CLOSE_LEASE_MS).toISOString();
      rec.closing = { phase: rec.phase, id, until };
    });
    this.deps.log.debug('secure phase claimed for closing', { jobId, phase: phaseName(phase), until });
    return id;
  }

  /**
   * @throws StateConflictError when the closing claim `claim` of `phase` is no longer this server's (lapsed and taken
   * over, or the phase closed); nothing on a store of one server.
   */
  private async checkClaim(jobId: string, phase: SecurePhase, claim: string | undefined): Promise<void> {
    const { store } = this.deps;
    if (store.fresh === undefined || claim === undefined) return;
    const rec = secureOf(await store.fresh(jobId));
    if (phaseOf(rec) !== phase) throw new StateConflictError(`job ${jobId} left ${phaseName(phase)} meanwhile`);
    if (rec.closing?.id !== claim)
      throw new StateConflictError(`job ${jobId}: another server took over closing ${phaseName(phase)}`);
  }

  private schedule(jobId: string, at: number): void {
    this.clearTimer(jobId);
    const t = setTimeout(
      () => {
        this.timers.delete(jobId);
        this.deps.poke(jobId);
      },
      Math.min(MAX_TIMER_MS, Math.max(0, at - Date.now()) + 10),
    );
    t.unref();
    this.timers.set(jobId, t);
  }

  private clearTimer(jobId: string): void {
    const t = this.timers.get(jobId);
    if (t !== undefined) clearTimeout(t);
    this.timers.delete(jobId);
  }
}
