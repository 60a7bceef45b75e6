/**
 * SecureAggregationService: the party token decides which party (and so which protocol number) a call speaks
 * for; the protocol itself is server/secure/secure-jobs.ts. docs/privacy.md.
 */
import type { Metadata } from '@grpc/grpc-js';
import type { SecureAggregationServiceServer, SupportChunk } from '../../proto/gen/dppa/v1/secure.js';
import { ValueDtype } from '../../proto/gen/dppa/v1/sparse.js';
import { encodeChunks } from '../../proto/sparse/index.js';
import { shapeNumel } from '../../proto/sparse/index.js';
import { PermissionDeniedError } from '../errors.js';
import type { JobStore } from '../jobs/job-store.js';
import type { SecureJobs } from '../secure/secure-jobs.js';
import { pause, unionPositions } from '../secure/union.js';
import type { Authenticator } from './auth.js';
import type { RpcWrapper } from './handler.js';

/** What the service needs. */
export interface SecureServiceDeps {
  store: JobStore;
  secure: SecureJobs;
  auth: Authenticator;
}

/** Positions per support chunk sent. */
const SUPPORT_CHUNK_ENTRIES = 1 << 18;
/** Positions encoded between two yields of GetSupport (whole chunks). */
const SUPPORT_SLICE = 4 * SUPPORT_CHUNK_ENTRIES;

/** The SecureAggregationService implementation. */
export function secureService(deps: SecureServiceDeps, rpc: RpcWrapper): SecureAggregationServiceServer {
  const { secure } = deps;
  const party = (metadata: Metadata, jobId: string): string => {
    const caller = deps.auth.requireJobAccess(metadata, jobId);
    if (caller.kind !== 'party') throw new PermissionDeniedError('secure aggregation calls need a party token');
    deps.store.get(jobId);
    return caller.party;
  };
  const S = 'dppa.v1.SecureAggregationService';
  return {
    advertiseKeys: rpc.unary(`${S}/AdvertiseKeys`, async (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      const r = await secure.advertise(req.jobId, p, {
        maskPublicKey: Uint8Array.from(req.maskPublicKey),
        sharePublicKey: Uint8Array.from(req.sharePublicKey),
      });
      return { partyIndex: r.index, parties: r.parties };
    }),
    getRoster: rpc.unary(`${S}/GetRoster`, (req, ctx) => {
      party(ctx.metadata, req.jobId);
      const r = secure.roster(req.jobId);
      return Promise.resolve({
        parties: r.parties.map((a) => ({
          index: a.index,
          partyId: a.partyId,
          maskPublicKey: a.maskPublicKey,
          sharePublicKey: a.sharePublicKey,
        })),
        threshold: r.threshold,
        phase: r.phase,
        partyCount: r.partyCount,
      });
    }),
    submitShares: rpc.unary(`${S}/SubmitShares`, async (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      const shares = req.shares.map((s) => ({ from: s.from, to: s.to, box: Uint8Array.from(s.box) }));
      return { sharers: await secure.submitShares(req.jobId, p, shares) };
    }),
    getShares: rpc.unary(`${S}/GetShares`, (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      return Promise.resolve(secure.shares(req.jobId, p));
    }),
    getSupport: rpc.serverStream(`${S}/GetSupport`, async (req, send, ctx) => {
      party(ctx.metadata, req.jobId);
      const u = await secure.union(req.jobId);
      for (const t of u.tensors) {
        let offset = t.offset;
        // Read and encoded slice by slice (whole chunks each, the same chunks and indices as one pass), yielding
        // between them.
        for (let start = 0; start < t.count; start += SUPPORT_SLICE) {
          const slice = await unionPositions(u, t, start, Math.min(SUPPORT_SLICE, t.count - start));
          const positions = Float64Array.from(slice);
          const chunks = encodeChunks(t.name, 0, positions, new Float32Array(0), {
            valueDtype: ValueDtype.VALUE_DTYPE_NONE,
            maxChunkEntries: SUPPORT_CHUNK_ENTRIES,
            firstIndex: start / SUPPORT_CHUNK_ENTRIES,
            numel: shapeNumel(t.shape),
          });
          for (const chunk of chunks) {
            ctx.signal.throwIfAborted();
            const msg: SupportChunk = {
              chunk,
              unionOffset: BigInt(offset),
              unionSize: BigInt(u.size),
              tensorSize: BigInt(shapeNumel(t.shape)),
            };
            await send(msg);
            offset += chunk.count;
          }
          await pause();
        }
      }
    }),
    uploadMasked: rpc.clientStream(`${S}/UploadMasked`, async (requests, ctx) => {
      const it = requests[Symbol.asyncIterator]();
      const first = await it.next();
      if (first.done === true) return { wordsHeld: 0n, wordsExpected: 0n, complete: false };
      const jobId = first.value.jobId;
      const p = party(ctx.metadata, jobId);
      async function* pieces(): AsyncGenerator<{
        offset: bigint;
        words: Uint8Array;
        crc32c: number;
        totalWords: bigint;
        clipped: bigint;
      }> {
        for (let r = first; r.done !== true; r = await it.next()) {
          if (r.value.jobId !== jobId)
            throw new PermissionDeniedError(`MaskedChunk job_id: ${r.value.jobId}, the stream is for ${jobId}`);
          yield r.value;
        }
      }
      const s = await secure.receiveMasked(jobId, p, pieces());
      return { wordsHeld: BigInt(s.wordsHeld), wordsExpected: BigInt(s.wordsExpected), complete: s.complete };
    }),
    getMaskedState: rpc.unary(`${S}/GetMaskedState`, async (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      const s = await secure.maskedState(req.jobId, p);
      return { wordsHeld: BigInt(s.wordsHeld), wordsExpected: BigInt(s.wordsExpected), complete: s.complete };
    }),
    getUnmaskRequest: rpc.unary(`${S}/GetUnmaskRequest`, (req, ctx) => {
      party(ctx.metadata, req.jobId);
      return Promise.resolve(secure.unmaskRequest(req.jobId));
    }),
    submitUnmask: rpc.unary(`${S}/SubmitUnmask`, async (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      const copy = (l: { owner: number; y: Uint8Array }[]): { owner: number; y: Uint8Array }[] =>
        l.map((s) => ({ owner: s.owner, y: Uint8Array.from(s.y) }));
      const responses = await secure.submitUnmask(req.jobId, p, {
        selfSeedShares: copy(req.selfSeedShares),
        maskKeyShares: copy(req.maskKeyShares),
      });
      return { responses };
    }),
    reportBadShare: rpc.unary(`${S}/ReportBadShare`, (req, ctx) => {
      const p = party(ctx.metadata, req.jobId);
      secure.reportBadShare(req.jobId, p, req.sender);
      return Promise.resolve({});
    }),
  };
}
