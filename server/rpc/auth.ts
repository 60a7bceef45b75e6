/**
 * Bearer tokens: `authorization: Bearer <token>` checked against the admin token and the parties' token hashes, in
 * constant time over all candidates. See docs/design/rpc.md.
 */
import { timingSafeEqual } from 'node:crypto';
import type { Metadata } from '@grpc/grpc-js';
import { PermissionDeniedError, UnauthenticatedError } from '../errors.js';
import type { JobStore } from '../jobs/job-store.js';
import { hashToken } from '../tokens.js';
import { noteCall } from './call-fields.js';

/** Who is calling. */
export type Caller = { kind: 'admin' } | { kind: 'party'; jobId: string; party: string };

function sameHash(a: Buffer, hex: string): boolean {
  return timingSafeEqual(a, Buffer.from(hex, 'hex'));
}

/** Resolves tokens to callers and checks what they may do. */
export class Authenticator {
  private readonly adminHash: string;

  constructor(
    adminToken: string,
    private readonly store: JobStore,
  ) {
    this.adminHash = hashToken(adminToken);
  }

  /**
   * The caller of a request.
   * @throws UnauthenticatedError when there is no bearer token or nobody holds it.
   */
  caller(metadata: Metadata): Caller {
    const values = metadata.get('authorization');
    const header = values.length === 1 && typeof values[0] === 'string' ? values[0] : undefined;
    const m = header === undefined ? null : /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (m === null)
      throw new UnauthenticatedError('missing credentials: send `authorization: Bearer <token>` metadata');
    const hash = Buffer.from(hashToken(m[1]!), 'hex');
    let found: Caller | undefined = sameHash(hash, this.adminHash) ? { kind: 'admin' } : undefined;
    // No early exit: every party is compared, whichever matches.
    for (const job of this.store.list()) {
      for (const p of job.parties)
        if (sameHash(hash, p.tokenSha256)) found = { kind: 'party', jobId: job.id, party: p.name };
    }
    if (found === undefined) throw new UnauthenticatedError('unknown token');
    if (found.kind === 'party') noteCall({ jobId: found.jobId, party: found.party });
    return found;
  }

  /** @throws UnauthenticatedError, or PermissionDeniedError unless the caller is the admin. */
  requireAdmin(metadata: Metadata): void {
    if (this.caller(metadata).kind !== 'admin') throw new PermissionDeniedError('this call needs the admin token');
  }

  /**
   * Admin, or a party of job `jobId`.
   * @throws UnauthenticatedError, or PermissionDeniedError for a party of another job.
   */
  requireJobAccess(metadata: Metadata, jobId: string): Caller {
    const caller = this.caller(metadata);
    if (caller.kind === 'party' && caller.jobId !== jobId)
      throw new PermissionDeniedError(`the token is not valid for job ${jobId}`);
    return caller;
  }

  /**
   * Exactly the party `party` of job `jobId` (uploads).
   * @throws UnauthenticatedError, or PermissionDeniedError for any other caller.
   */
  requireParty(metadata: Metadata, jobId: string, party: string): void {
    const caller = this.caller(metadata);
    if (caller.kind !== 'party' || caller.jobId !== jobId || caller.party !== party) {
      throw new PermissionDeniedError(`the token is not party ${JSON.stringify(party)}'s token for job ${jobId}`);
    }
  }
}
