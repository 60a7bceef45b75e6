/**
 * The server's side of the protocol as a state machine over plain data. It
 * relays keys and sealed share boxes (it cannot open them), adds up the masked
 * vectors as they complete, and once enough survivors reveal their shares
 * rebuilds the survivors' self-mask seeds and the dropouts' mask keys and
 * removes every mask from the sum. Each method checks its input before it
 * changes anything, so a refused message leaves the job as it was; `state`
 * can be stored and the aggregation restored from it after a restart.
 */
import { DuplicateSubmissionError, InconsistentSharesError, MaskedLengthError, ProtocolStateError } from './errors.js';
import { pairwiseMaskKey, selfMaskKey } from './masks.js';
import type { EncryptedShare, KeyAdvertisement, SecureJob, UnmaskRequest, UnmaskResponse } from './messages.js';
import { SHARE_PLAINTEXT_BYTES } from './party.js';
import { combineShares, shareBytes, type ShamirShare } from './shamir.js';
import { BOX_OVERHEAD } from './share-box.js';
import { addInto, removeMasks, type MaskRemoval } from './unmask.js';
import { checkAdvertisement, checkEnough, checkIndex, checkJob, sameBytes } from './validate.js';
import { KEY_BYTES, publicKeyOf } from './x25519.js';

/** The round the server is collecting. */
export type AggregatorPhase = 'keys' | 'shares' | 'masked' | 'unmask' | 'done';

/** The server's whole state of one secure job: plain data. */
export interface AggregatorState {
  version: 1;
  job: SecureJob;
  phase: AggregatorPhase;
  /** Round 0 advertisements; U1 once closed. */
  roster: KeyAdvertisement[];
  /** Round 1: the boxes received, from the senders (U2 once closed). */
  boxes: EncryptedShare[];
  sharers: number[];
  /** Length of the vectors on U, set when round 1 closes. */
  length: number;
  /** Whether the masked vectors stay in the caller's spool (no sum held here). */
  spooled: boolean;
  /** Sum modulo 2^32 of the masked vectors received (U3: their senders); empty when spooled. */
  sum: Uint32Array;
  survivors: number[];
  /** Round 3: the request sent and the responses received. */
  request?: UnmaskRequest;
  responses: UnmaskResponse[];
}

const SHARE_Y = shareBytes(KEY_BYTES);

/** One secure aggregation, server side. */
export class SecureAggregator {
  readonly #state: AggregatorState;

  private constructor(state: AggregatorState) {
    this.#state = state;
  }

  /** A new aggregation for `job`, collecting key advertisements. */
  static create(job: SecureJob): SecureAggregator {
    checkJob(job);
    return new SecureAggregator({
      version: 1,
      job: { ...job },
      phase: 'keys',
      roster: [],
      boxes: [],
      sharers: [],
      length: 0,
      spooled: false,
      sum: new Uint32Array(0),
      survivors: [],
      responses: [],
    });
  }

  /** An aggregation from a stored state. */
  static restore(state: AggregatorState): SecureAggregator {
    if (state.version !== 1) throw new ProtocolStateError(`aggregator state version ${String(state.version)}`);
    checkJob(state.job);
    return new SecureAggregator(state);
  }

  /** The state, to store (do not modify it). */
  get state(): AggregatorState {
    return this.#state;
  }

  get phase(): AggregatorPhase {
    return this.#state.phase;
  }

  #expect(phase: AggregatorPhase, what: string): void {
    if (this.#state.phase !== phase)
      throw new ProtocolStateError(`${what}: the job is collecting ${this.#state.phase}`);
  }

  /** Round 0: a party's keys. @throws DuplicateSubmissionError on a second advertisement of one party */
  advertise(ad: KeyAdvertisement): void {
    const s = this.#state;
    this.#expect('keys', 'key advertisement');
    checkAdvertisement(s.job, ad);
    if (s.roster.some((a) => a.index === ad.index))
      throw new DuplicateSubmissionError(`party ${ad.index} advertised its keys twice`);
    s.roster.push({ index: ad.index, maskPublicKey: ad.maskPublicKey, sharePublicKey: ad.sharePublicKey });
  }

  /** Closes round 0: the roster U1 every party receives. @throws TooFewSurvivorsError */
  closeKeys(): KeyAdvertisement[] {
    const s = this.#state;
    this.#expect('keys', 'close keys');
    checkEnough(s.job, 'share keys', s.roster.length);
    s.roster.sort((a, b) => a.index - b.index);
    s.phase = 'shares';
    return s.roster.map((a) => ({
      index: a.index,
      maskPublicKey: a.maskPublicKey.slice(),
      sharePublicKey: a.sharePublicKey.slice(),
    }));
  }

  /**
   * Round 1: a party's boxes, one to every other party of U1 (the server checks
   * their addressing and size; only the recipient can authenticate them).
   * @throws DuplicateSubmissionError if the party already sent its boxes
   * @throws ProtocolStateError for a sender outside U1 or boxes that do not address U1 once each
   */
  submitShares(from: number, boxes: readonly EncryptedShare[]): void {
    const s = this.#state;
    this.#expect('shares', 'shares');
    if (!s.roster.some((a) => a.index === from))
      throw new ProtocolStateError(`shares from party ${from}, not in the roster`);
    if (s.sharers.includes(from)) throw new DuplicateSubmissionError(`party ${from} sent its shares twice`);
    const expected = s.roster.map((a) => a.index).filter((i) => i !== from);
    const to = boxes.map((b) => b.to).sort((a, b) => a - b);
    if (to.length !== expected.length || to.some((v, i) => v !== expected[i])) {
      throw new ProtocolStateError(`party ${from}: shares must go to parties ${expected.join(',')} once each`);
    }
    for (const b of boxes) {
      if (b.from !== from) throw new ProtocolStateError(`party ${from}: a box claims to come from party ${b.from}`);
      if (b.box.length !== SHARE_PLAINTEXT_BYTES + BOX_OVERHEAD)
        throw new ProtocolStateError(`party ${from}: a box of ${b.box.length} bytes`);
    }
    s.boxes.push(...boxes.map((b) => ({ from, to: b.to, box: b.box })));
    s.sharers.push(from);
  }

  /**
   * Closes round 1: U2 is fixed and masked vectors of `length` words (|U|) are
   * expected. With `spooled`, the caller keeps the masked vectors (in files)
   * and reports each complete one with `recordMasked`; it then sums them and
   * removes the masks range by range with `maskRemoval` and `removeMasks`.
   * @throws TooFewSurvivorsError
   */
  closeShares(length: number, opts: { spooled?: boolean } = {}): number[] {
    const s = this.#state;
    this.#expect('shares', 'close shares');
    if (!Number.isSafeInteger(length) || length < 0) throw new ProtocolStateError(`union length ${length}`);
    checkEnough(s.job, 'masked input', s.sharers.length);
    s.sharers.sort((a, b) => a - b);
    s.length = length;
    s.spooled = opts.spooled ?? false;
    s.sum = new Uint32Array(s.spooled ? 0 : length);
    s.phase = 'masked';
    return [...s.sharers];
  }

  /** Round 1 relay: the boxes of U2 addressed to party `to`. */
  sharesFor(to: number): EncryptedShare[] {
    const s = this.#state;
    if (s.phase === 'keys' || s.phase === 'shares')
      throw new ProtocolStateError('shares are relayed once round 1 is closed');
    return s.boxes.filter((b) => b.to === to && s.sharers.includes(b.from));
  }

  /**
   * Round 2: a party's whole masked vector, added into the sum.
   * @throws MaskedLengthError if it is not |U| words long
   * @throws DuplicateSubmissionError on a second vector from one party
   * @throws ProtocolStateError for a party outside U2 or a round out of turn
   */
  submitMasked(from: number, words: Uint32Array): void {
    if (this.#state.spooled) throw new ProtocolStateError('masked vectors of this job are spooled: use recordMasked');
    this.#checkMasked(from, words.length);
    addInto(this.#state.sum, words);
    this.#state.survivors.push(from);
  }

  /**
   * Round 2, spooled: a party's masked vector of `wordCount` words is complete in the caller's spool.
   * @throws the errors of `submitMasked`
   */
  recordMasked(from: number, wordCount: number): void {
    if (!this.#state.spooled)
      throw new ProtocolStateError('masked vectors of this job are held in memory: use submitMasked');
    this.#checkMasked(from, wordCount);
    this.#state.survivors.push(from);
  }

  #checkMasked(from: number, wordCount: number): void {
    const s = this.#state;
    this.#expect('masked', 'masked input');
    if (!s.sharers.includes(from))
      throw new ProtocolStateError(`masked input from party ${from}, which did not share its keys`);
    if (s.survivors.includes(from)) throw new DuplicateSubmissionError(`party ${from} sent its masked input twice`);
    if (wordCount !== s.length)
      throw new MaskedLengthError(`party ${from}: ${wordCount} masked words, the union has ${s.length}`);
  }

  /** Closes round 2: U3 is fixed; the request every survivor receives. @throws TooFewSurvivorsError */
  closeMasked(): UnmaskRequest {
    const s = this.#state;
    this.#expect('masked', 'close masked input');
    checkEnough(s.job, 'unmasking', s.survivors.length);
    s.survivors.sort((a, b) => a - b);
    s.request = { survivors: [...s.survivors], dropouts: s.sharers.filter((i) => !s.survivors.includes(i)) };
    s.phase = 'unmask';
    return { survivors: [...s.request.survivors], dropouts: [...s.request.dropouts] };
  }

  /**
   * Round 3: a survivor's revealed shares.
   * @throws DuplicateSubmissionError on a second response of one party
   * @throws ProtocolStateError for a responder outside U3 or a response that does not match the request
   */
  submitUnmask(response: UnmaskResponse): void {
    const s = this.#state;
    this.#expect('unmask', 'unmask response');
    const request = s.request!;
    checkIndex(s.job, response.from, 'unmask response');
    if (!request.survivors.includes(response.from))
      throw new ProtocolStateError(`unmask response from party ${response.from}, not a survivor`);
    if (s.responses.some((r) => r.from === response.from))
      throw new DuplicateSubmissionError(`party ${response.from} answered the unmask request twice`);
    const matches = (shares: UnmaskResponse['selfSeedShares'], owners: number[]): boolean =>
      shares.length === owners.length && shares.every((sh, i) => sh.owner === owners[i] && sh.y.length === SHARE_Y);
    if (!matches(response.selfSeedShares, request.survivors) || !matches(response.maskKeyShares, request.dropouts)) {
      throw new ProtocolStateError(
        `party ${response.from}: the response does not hold one share per party named, in order`,
      );
    }
    s.responses.push(response);
  }

  /**
   * What to subtract from the sum, rebuilt from the responses so far (at least
   * the threshold). A dropout's rebuilt mask key must match its published key.
   * @throws TooFewSurvivorsError with fewer responses than the threshold
   * @throws InconsistentSharesError if the revealed shares disagree
   */
  maskRemoval(): MaskRemoval {
    const s = this.#state;
    if (s.phase !== 'unmask' && s.phase !== 'done')
      throw new ProtocolStateError(`unmasking: the job is collecting ${s.phase}`);
    checkEnough(s.job, 'unmasking', s.responses.length);
    const request = s.request!;
    const sharesOf = (owner: number, kind: 'selfSeedShares' | 'maskKeyShares'): ShamirShare[] =>
      s.responses.map((r) => ({ x: r.from, y: r[kind].find((sh) => sh.owner === owner)!.y }));
    const selfKeys = request.survivors.map((u) =>
      selfMaskKey(combineShares(sharesOf(u, 'selfSeedShares'), s.job.threshold, KEY_BYTES), s.job.jobId),
    );
    const pairs: MaskRemoval['pairs'] = [];
    for (const d of request.dropouts) {
      const privateKey = combineShares(sharesOf(d, 'maskKeyShares'), s.job.threshold, KEY_BYTES);
      const published = s.roster.find((a) => a.index === d)!.maskPublicKey;
      if (!sameBytes(publicKeyOf(privateKey), published))
        throw new InconsistentSharesError(`the shares of party ${d}'s mask key do not give its published key`);
      for (const v of request.survivors) {
        const survivorKey = s.roster.find((a) => a.index === v)!.maskPublicKey;
        pairs.push({ survivor: v, dropout: d, key: pairwiseMaskKey(privateKey, survivorKey, s.job.jobId) });
      }
    }
    return { selfKeys, pairs };
  }

  /**
   * Removes the masks: the sum of the survivors' coded values on U (decode it
   * with `decodeSum`). The state then holds the unmasked sum.
   * @throws TooFewSurvivorsError with fewer responses than the threshold
   */
  finish(): Uint32Array {
    const s = this.#state;
    if (s.phase === 'done') return s.sum;
    this.#expect('unmask', 'finish');
    if (s.spooled)
      throw new ProtocolStateError(
        'masked vectors of this job are spooled: remove the masks with maskRemoval and removeMasks',
      );
    removeMasks(s.sum, this.maskRemoval());
    s.phase = 'done';
    return s.sum;
  }

  /**
   * Spooled path: records that the caller has removed the masks from every
   * range of its spool (with `maskRemoval` and `removeMasks`), so a restored
   * state knows unmasking is over. Calling it again is harmless.
   * @throws TooFewSurvivorsError with fewer responses than the threshold
   * @throws ProtocolStateError when the job is not spooled (use `finish`) or not unmasking
   */
  complete(): void {
    const s = this.#state;
    if (s.phase === 'done') return;
    this.#expect('unmask', 'complete');
    if (!s.spooled)
      throw new ProtocolStateError('masked vectors of this job are summed here: remove the masks with finish');
    checkEnough(s.job, 'unmasking', s.responses.length);
    s.phase = 'done';
  }
}
