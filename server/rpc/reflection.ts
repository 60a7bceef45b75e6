/**
 * gRPC server reflection (for grpcurl and the like), from the repository's proto/ folder. See docs/design/rpc.md.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Server } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';

/** The .proto files of the services this server runs, relative to the proto folder. */
const PROTO_FILES = [
  'dppa/v1/jobs.proto',
  'dppa/v1/upload.proto',
  'dppa/v1/download.proto',
  'dppa/v1/evaluation.proto',
  'dppa/v1/secure.proto',
  'dppa/v1/sparse.proto',
  'grpc/health/v1/health.proto',
];

/**
 * The folder holding `dppa/v1/*.proto`.
 * @throws Error if neither the source nor the build location has it.
 */
export function protoRoot(): string {
  for (const rel of ['../../proto/', '../../../proto/']) {
    const dir = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(`${dir}dppa/v1/jobs.proto`)) return dir;
  }
  throw new Error(`cannot find the proto/ folder near ${fileURLToPath(import.meta.url)}`);
}

/** Adds the reflection service (v1 and v1alpha) describing the server's schema. */
export function addReflection(server: Server): void {
  const root = protoRoot();
  const pkg = loadSync(
    PROTO_FILES.map((f) => `${root}${f}`),
    { includeDirs: [root] },
  );
  new ReflectionService(pkg).addToServer(server);
}
