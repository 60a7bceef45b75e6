/**
 * A party's side of the protocol as a state machine over plain data: each
 * round method takes the round's input, checks it, and either throws (state
 * unchanged) or moves on. `state` can be stored and a party restored from it
 * with `SecureParty.restore`; every round's answer is the same when asked
 * again, so a party that restarts can answer a repeated request.
 */
import { randomBytes } from 'node:crypto';
import { DuplicateSubmissionError, ProtocolStateError, ShareAuthError } from './errors.js';
import type { FixedPoint, Encoded } from './fixed-point.js';
import { maskValues, pairwiseMaskKey, selfMaskKey, applyMasks, type MaskKeys } from './masks.js';
import {
  SHARE_ROUND,
  type EncryptedShare,
  type KeyAdvertisement,
  type SecureJob,
  type UnmaskRequest,
  type UnmaskResponse,
} from './messages.js';
import { shareBytes, splitSecret } from './shamir.js';
import { boxKey, openBox, sealBox } from './share-box.js';
import { checkAdvertisement, checkEnough, checkIndex, checkJob, sameBytes } from './validate.js';
import { generateKeyPair, KEY_BYTES, type KeyPair } from './x25519.js';

/** Bytes of one share of a 32-byte secret. */
const SHARE_Y = shareBytes(KEY_BYTES);
/** Plaintext of a share box: the share of the self-mask seed, then of the mask private key. */
export const SHARE_PLAINTEXT_BYTES = 2 * SHARE_Y;

/** Shares this party holds of one party's secrets (its own included), at x = this party's index. */
export interface HeldShare {
  owner: number;
  selfSeed: Uint8Array;
  maskKey: Uint8Array;
}

/** What the party expects next. */
export type PartyPhase = 'roster' | 'shares' | 'input' | 'done';

/** A party's whole state: plain data. */
export interface PartyState {
  version: 1;
  job: SecureJob;
  index: number;
  phase: PartyPhase;
  maskKeys: KeyPair;
  shareKeys: KeyPair;
  /** b_u: the seed of the self mask. */
  selfSeed: Uint8Array;
  /** U1, from round 1 on. */
  roster: KeyAdvertisement[];
  /** The boxes sent in round 1 (sent again as they are if asked again). */
  outbox: EncryptedShare[];
  /** Shares held, from round 2 on (U2: their owners). */
  held: HeldShare[];
  /** The request answered in round 3 (no other is answered after it). */
  answered?: UnmaskRequest;
}

function sortedUnique(xs: readonly number[], what: string): number[] {
  const sorted = [...xs].sort((a, b) => a - b);
  for (let i = 1; i < sorted.length; i++)
    if (sorted[i] === sorted[i - 1]) throw new ProtocolStateError(`${what}: party ${sorted[i]} twice`);
  return sorted;
}

function sameList(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** One party of a secure job. */
export class SecureParty {
  readonly #state: PartyState;
  #maskKeys: MaskKeys | undefined;

  private constructor(state: PartyState) {
    this.#state = state;
  }

  /** A new party `index` of `job`, with fresh keys and seed. */
  static create(job: SecureJob, index: number): SecureParty {
    checkJob(job);
    checkIndex(job, index, 'party');
    return new SecureParty({
      version: 1,
      job: { ...job },
      index,
      phase: 'roster',
      maskKeys: generateKeyPair(),
      shareKeys: generateKeyPair(),
      selfSeed: new Uint8Array(randomBytes(KEY_BYTES)),
      roster: [],
      outbox: [],
      held: [],
    });
  }

  /** A party from a stored state. */
  static restore(state: PartyState): SecureParty {
    if (state.version !== 1) throw new ProtocolStateError(`party state version ${String(state.version)}`);
    checkJob(state.job);
    return new SecureParty(state);
  }

  /** The state, to store (do not modify it). */
  get state(): PartyState {
    return this.#state;
  }

  get phase(): PartyPhase {
    return this.#state.phase;
  }

  /** Round 0: the public keys to publish. */
  advertise(): KeyAdvertisement {
    const s = this.#state;
    return { index: s.index, maskPublicKey: s.maskKeys.publicKey, sharePublicKey: s.shareKeys.publicKey };
  }

  /**
   * Round 1: given the roster U1, the boxes to send, one to every other party.
   * @throws ProtocolStateError for a roster without this party's own keys, repeated parties or keys, or a round out of turn
   * @throws TooFewSurvivorsError if the roster is smaller than the threshold
   */
  shareKeys(roster: readonly KeyAdvertisement[]): EncryptedShare[] {
    const s = this.#state;
    const indices = sortedUnique(
      roster.map((ad) => ad.index),
      'roster',
    );
    if (s.phase !== 'roster') {
      if (
        sameList(
          indices,
          s.roster.map((ad) => ad.index),
        ) &&
        roster.every((ad) =>
          sameKeys(
            ad,
            s.roster.find((a) => a.index === ad.index)!,
          ),
        )
      )
        return s.outbox;
      throw new ProtocolStateError(`party ${s.index}: shares already sent for another roster`);
    }
    for (const ad of roster) checkAdvertisement(s.job, ad);
    checkEnough(s.job, 'share keys', roster.length);
    const own = roster.find((ad) => ad.index === s.index);
    if (
      own === undefined ||
      !sameBytes(own.maskPublicKey, s.maskKeys.publicKey) ||
      !sameBytes(own.sharePublicKey, s.shareKeys.publicKey)
    ) {
      throw new ProtocolStateError(`party ${s.index}: the roster does not hold this party's keys`);
    }
    const keys = roster
      .flatMap((ad) => [ad.maskPublicKey, ad.sharePublicKey])
      .map((k) => Buffer.from(k).toString('hex'));
    if (new Set(keys).size !== keys.length) throw new ProtocolStateError('roster: a public key appears twice');

    const sorted = [...roster].sort((a, b) => a.index - b.index);
    const seedShares = splitSecret(s.selfSeed, s.job.threshold, indices);
    const keyShares = splitSecret(s.maskKeys.privateKey, s.job.threshold, indices);
    const outbox: EncryptedShare[] = [];
    let held: HeldShare | undefined;
    sorted.forEach((ad, i) => {
      const selfSeed = seedShares[i]!.y;
      const maskKey = keyShares[i]!.y;
      if (ad.index === s.index) {
        held = { owner: s.index, selfSeed, maskKey };
        return;
      }
      const key = boxKey(s.shareKeys.privateKey, ad.sharePublicKey, s.job.jobId);
      const ctx = { jobId: s.job.jobId, sender: s.index, recipient: ad.index, round: SHARE_ROUND };
      outbox.push({ from: s.index, to: ad.index, box: sealBox(key, ctx, Buffer.concat([selfSeed, maskKey])) });
    });
    s.roster = sorted;
    s.outbox = outbox;
    s.held = held === undefined ? [] : [held];
    s.phase = 'shares';
    return outbox;
  }

  /**
   * Round 2: the boxes the other parties of U2 sent this party. Every box is
   * opened before anything is kept: on an error the state is unchanged.
   * @throws ShareAuthError for a box that fails authentication or is addressed to another party
   * @throws DuplicateSubmissionError for two boxes from one sender
   * @throws ProtocolStateError for a sender outside the roster or a round out of turn (the same
   *   senders' boxes delivered again once taken are ignored)
   * @throws TooFewSurvivorsError if U2 is smaller than the threshold
   */
  receiveShares(shares: readonly EncryptedShare[]): void {
    const s = this.#state;
    if (s.phase !== 'shares') {
      // Delivered again (the party restarted before the server heard back): the shares are already held.
      if (
        s.phase !== 'roster' &&
        sameList(
          sortedUnique(
            shares.map((sh) => sh.from),
            'shares',
          ),
          this.peers,
        )
      )
        return;
      throw new ProtocolStateError(`party ${s.index}: not waiting for shares (phase ${s.phase})`);
    }
    const seen = new Set<number>();
    const held: HeldShare[] = [];
    for (const share of shares) {
      if (share.to !== s.index) throw new ShareAuthError(share.from, `addressed to party ${share.to}, not ${s.index}`);
      if (share.from === s.index) throw new ProtocolStateError(`party ${s.index}: a share from itself`);
      const sender = s.roster.find((ad) => ad.index === share.from);
      if (sender === undefined)
        throw new ProtocolStateError(`party ${s.index}: a share from party ${share.from}, not in the roster`);
      if (seen.has(share.from))
        throw new DuplicateSubmissionError(`party ${s.index}: two shares from party ${share.from}`);
      seen.add(share.from);
      const key = boxKey(s.shareKeys.privateKey, sender.sharePublicKey, s.job.jobId);
      const plain = openBox(
        key,
        { jobId: s.job.jobId, sender: share.from, recipient: s.index, round: SHARE_ROUND },
        share.box,
      );
      if (plain.length !== SHARE_PLAINTEXT_BYTES)
        throw new ShareAuthError(share.from, `plaintext of ${plain.length} bytes`);
      held.push({ owner: share.from, selfSeed: plain.slice(0, SHARE_Y), maskKey: plain.slice(SHARE_Y) });
    }
    checkEnough(s.job, 'masked input', held.length + 1);
    s.held = [...s.held, ...held].sort((a, b) => a.owner - b.owner);
    s.phase = 'input';
  }

  /** U2 without this party: the peers it masks with (from round 2 on). */
  get peers(): number[] {
    return this.#state.held.map((h) => h.owner).filter((i) => i !== this.#state.index);
  }

  /** Round 2: the keys of this party's masks, to mask a long vector range by range. */
  maskKeys(): MaskKeys {
    const s = this.#state;
    if (s.phase !== 'input' && s.phase !== 'done')
      throw new ProtocolStateError(`party ${s.index}: masks not known yet (phase ${s.phase})`);
    // Fixed from here on (the roster and the shares held no longer change): derived once, not per chunk.
    return (this.#maskKeys ??= this.#deriveMaskKeys());
  }

  #deriveMaskKeys(): MaskKeys {
    const s = this.#state;
    const peers = this.peers.map((index) => {
      const ad = s.roster.find((a) => a.index === index)!;
      return { index, key: pairwiseMaskKey(s.maskKeys.privateKey, ad.maskPublicKey, s.job.jobId) };
    });
    return { index: s.index, self: selfMaskKey(s.selfSeed, s.job.jobId), peers };
  }

  /**
   * Round 2: codes and masks the party's values on U (or the range of them at
   * `offset`). Deterministic: the same values give the same words, so an
   * upload can be resumed; masking other values in the same job would let the
   * server see their difference.
   */
  maskInput(values: ArrayLike<number>, fp: FixedPoint, offset = 0): Encoded {
    return maskValues(values, fp, this.maskKeys(), offset);
  }

  /** Round 2: masks already coded words in place (see `maskInput`). */
  maskWords(words: Uint32Array, offset = 0): void {
    applyMasks(words, this.maskKeys(), offset);
  }

  /**
   * Round 3: reveals this party's share of each survivor's seed and of each
   * dropout's mask key. Answers one request only (asked again, the same one):
   * revealing both secrets of one party would unmask its input.
   * @throws ProtocolStateError for a request that is not a partition of U2 with this party a survivor, or a second different request
   * @throws TooFewSurvivorsError if fewer survivors than the threshold are named
   */
  unmask(request: UnmaskRequest): UnmaskResponse {
    const s = this.#state;
    const survivors = sortedUnique(request.survivors, 'survivors');
    const dropouts = sortedUnique(request.dropouts, 'dropouts');
    if (s.phase === 'done') {
      if (sameList(survivors, s.answered!.survivors) && sameList(dropouts, s.answered!.dropouts))
        return this.#respond(survivors, dropouts);
      throw new ProtocolStateError(`party ${s.index}: already answered another unmask request`);
    }
    if (s.phase !== 'input') throw new ProtocolStateError(`party ${s.index}: not ready to unmask (phase ${s.phase})`);
    const owners = s.held.map((h) => h.owner);
    if (!sameList(sortedUnique([...survivors, ...dropouts], 'unmask request'), owners)) {
      throw new ProtocolStateError(
        `party ${s.index}: survivors and dropouts must split the parties that shared, ${owners.join(',')}`,
      );
    }
    if (!survivors.includes(s.index))
      throw new ProtocolStateError(`party ${s.index}: named a dropout but asked to respond`);
    checkEnough(s.job, 'unmasking', survivors.length);
    s.answered = { survivors, dropouts };
    s.phase = 'done';
    return this.#respond(survivors, dropouts);
  }

  #respond(survivors: number[], dropouts: number[]): UnmaskResponse {
    const s = this.#state;
    const heldOf = (owner: number): HeldShare => s.held.find((h) => h.owner === owner)!;
    return {
      from: s.index,
      selfSeedShares: survivors.map((owner) => ({ owner, y: heldOf(owner).selfSeed })),
      maskKeyShares: dropouts.map((owner) => ({ owner, y: heldOf(owner).maskKey })),
    };
  }
}

/** True if two advertisements carry the same public keys. */
function sameKeys(a: KeyAdvertisement, b: KeyAdvertisement): boolean {
  return sameBytes(a.maskPublicKey, b.maskPublicKey) && sameBytes(a.sharePublicKey, b.sharePublicKey);
}
