/**
 * UploadService: the party's token decides which upload a call may touch; the stream itself is handled by
 * uploads/upload-session.ts. See docs/design/uploads.md.
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
      return uploadState(req.jobId, req.party, await deps.spool.ofParty(req.jobId, req.party));
    }),
    upload: rpc.clientStream('dppa.v1.UploadService/Upload', (requests, ctx) => receiveUpload(deps, requests, ctx)),
  };
}
