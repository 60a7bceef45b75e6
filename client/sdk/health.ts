/**
 * {@link checkHealth}: asks a server's standard gRPC health service
 * (`grpc.health.v1.Health/Check`) whether it serves. It needs no token, so
 * that probes (`dppa health`, a container's HEALTHCHECK) hold no secret.
 */
import { Metadata, type ClientUnaryCall } from '@grpc/grpc-js';
import {
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthClient,
  type HealthCheckResponse,
} from '../../proto/gen/grpc/health/v1/health.js';
import { CallScope, type CallOptions } from './call.js';
import { channelCredentials, serverNameOptions, transportDefaults, type TransportOptions } from './connection.js';
import { DppaRpcError } from './errors.js';

/** Options of {@link checkHealth}: the connection's, without a token. */
export interface HealthCheckOptions extends TransportOptions {
  /** The service asked about, e.g. `dppa.v1.UploadService`. @default '' (the whole server) */
  service?: string;
}

/** What the health service answered. */
export type ServingStatusName = 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN' | 'UNKNOWN';

/**
 * The serving status of the server (or of one of its services). Not retried:
 * a probe wants the answer of now.
 * @throws RangeError naming a bad option; DppaRpcError (UNAVAILABLE when the
 *   server cannot be reached, NOT_FOUND for a service it does not have,
 *   DEADLINE_EXCEEDED past `timeoutMs`); the signal's reason when aborted.
 */
export async function checkHealth(options: HealthCheckOptions, opts: CallOptions = {}): Promise<ServingStatusName> {
  const o = transportDefaults(options);
  const method = 'Health/Check';
  const scope = new CallScope(method, { ...opts, timeoutMs: opts.timeoutMs ?? o.timeoutMs });
  const client = new HealthClient(o.address, channelCredentials(o), serverNameOptions(o));
  try {
    scope.check();
    const response = await new Promise<HealthCheckResponse>((resolve, reject) => {
      let call: ClientUnaryCall | undefined = undefined;
      const onAbort = (): void => call?.cancel();
      call = client.check(
        { service: options.service ?? '' },
        new Metadata(),
        { deadline: new Date(scope.deadline!) },
        (err, res) => {
          scope.signal.removeEventListener('abort', onAbort);
          if (err === null) resolve(res);
          else reject(err);
        },
      );
      scope.signal.addEventListener('abort', onAbort, { once: true });
    });
    switch (response.status) {
      case ServingStatus.SERVING:
        return 'SERVING';
      case ServingStatus.NOT_SERVING:
        return 'NOT_SERVING';
      case ServingStatus.SERVICE_UNKNOWN:
        return 'SERVICE_UNKNOWN';
      default:
        return 'UNKNOWN';
    }
  } catch (err) {
    throw DppaRpcError.from(scope.reason(err), method);
  } finally {
    scope.dispose();
    client.close();
  }
}
