/**
 * UploadService: the party's token decides which upload a call may touch;
 * the stream itself is handled by uploads/upload-session.ts.
 *
 * With replicas sharing the data folder, a party's upload may have started
 * on another replica: the party's spool is read again before its state is
 * answered and before its stream is taken in (by the upload session).
 */
import type { UploadServiceServer } from '../../proto/gen/dppa/v1/upload.js';
import { receiveUpload, uploadState, type UploadDeps } from '../uploads/upload-session.js';
import type { RpcWrapper } from './handler.js';

/** The UploadService implementation. */
export function uploadService(deps: UploadDeps, rpc: RpcWrapper): UploadServiceServer {
  return {
    getUploadState: rpc.unary('dppa.v1.UploadService/GetUploadState', async (req, ctx) => {
      deps.auth.requireParty(ctx.metadata, req.jobId, req.party);
      deps.store.get(req.jobId);
      await deps.spool.refreshJob(req.jobId, req.party);
      return uploadState(req.jobId, req.party, deps.spool.party(req.jobId, req.party));
    }),
    upload: rpc.clientStream('dppa.v1.UploadService/Upload', (requests, ctx) => receiveUpload(deps, requests, ctx)),
  };
}

