/**
 * The UploadService client of the SDK: records read from a `.dppa` file are sent as the bytes they were read as,
 * not encoded anew. See docs/design/uploads.md.
 */
import { makeGenericClientConstructor } from '@grpc/grpc-js';
import { UploadRequest, type UploadServiceClient, UploadServiceService } from '../../proto/gen/dppa/v1/upload.js';
import { encodeSoleField } from '../../proto/sparse/index.js';

/** Field number of `record` in UploadRequest. */
const RECORD_FIELD = 2;

/** An UploadRequest as grpc-js sends it. */
export function serializeUploadRequest(req: UploadRequest): Buffer {
  const sole =
    req.open === undefined && req.record !== undefined ? encodeSoleField(RECORD_FIELD, req.record) : undefined;
  return sole ?? Buffer.from(UploadRequest.encode(req).finish());
}

/** UploadServiceClient whose Upload sends remembered record bytes (see the module's comment). */
export const UploadClientSendingRecords = makeGenericClientConstructor(
  { ...UploadServiceService, upload: { ...UploadServiceService.upload, requestSerialize: serializeUploadRequest } },
  'dppa.v1.UploadService',
) as unknown as typeof UploadServiceClient;
