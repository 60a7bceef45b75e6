/**
 * The protocol's round messages and its job parameters: plain data (numbers
 * and byte arrays) that map one to one onto gRPC messages. The rounds are
 * described in docs/privacy.md.
 */

/** The round number bound into the share boxes. */
export const SHARE_ROUND = 1;

/** Parameters fixed when a secure job is created. */
export interface SecureJob {
  jobId: string;
  /** Parties are numbered 1..parties. */
  parties: number;
  /** Shares needed to rebuild a secret: at least this many parties must survive each phase. */
  threshold: number;
}

/** Round 0: a party's public keys. */
export interface KeyAdvertisement {
  index: number;
  /** X25519 key of the pairwise masks. */
  maskPublicKey: Uint8Array;
  /** X25519 key of the share boxes. */
  sharePublicKey: Uint8Array;
}

/** Round 1: a sealed box of shares from one party to another, relayed by the server. */
export interface EncryptedShare {
  from: number;
  to: number;
  box: Uint8Array;
}

/** Round 3, from the server: whose seeds and whose mask keys it needs. */
export interface UnmaskRequest {
  /** U3: the parties whose masked vectors the server holds. */
  survivors: number[];
  /** U2 \ U3: the parties that shared their keys but whose masked vector never came. */
  dropouts: number[];
}

/** A share revealed to the server: the responder's share of `owner`'s secret. */
export interface RevealedShare {
  owner: number;
  y: Uint8Array;
}

/** Round 3, from a party: its shares of the survivors' seeds and of the dropouts' mask keys. */
export interface UnmaskResponse {
  from: number;
  selfSeedShares: RevealedShare[];
  maskKeyShares: RevealedShare[];
}
