/**
 * The standard gRPC health service (grpc.health.v1.Health): SERVING for the
 * server ("") and each of its services while it runs, NOT_SERVING once it
 * begins to stop, NOT_FOUND for a service it does not have.
 */
import {
  HealthCheckResponse_ServingStatus as ServingStatus,
  type HealthServer,
} from '../../proto/gen/grpc/health/v1/health.js';
import { NotFoundError } from '../errors.js';
import type { RpcWrapper } from './handler.js';

/** The serving status the health service reports. */
export class HealthState {
  private serving = true;
  private readonly listeners = new Set<() => void>();

  constructor(
    /** Service names reported on, besides "" (the whole server). */
    readonly services: readonly string[],
  ) {}

  /** Status of `service`, or undefined for a service the server does not have. */
  status(service: string): ServingStatus | undefined {
    if (service !== '' && !this.services.includes(service)) return undefined;
    return this.serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING;
  }

  /** Reports NOT_SERVING from now on (the server is stopping). */
  setNotServing(): void {
    this.serving = false;
    for (const l of this.listeners) l();
  }

  /** Calls `listener` on every change until the returned function is called. */
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

/** The Health implementation. */
export function healthService(state: HealthState, rpc: RpcWrapper): HealthServer {
  return {
    check: rpc.unary('grpc.health.v1.Health/Check', (req) => {
      const status = state.status(req.service);
      if (status === undefined) throw new NotFoundError(`unknown service ${JSON.stringify(req.service)}`);
      return Promise.resolve({ status });
    }),
    // Sends the status now and on every change, until the caller leaves or the server stops.
    watch: rpc.serverStream(
      'grpc.health.v1.Health/Watch',
      async (req, send, ctx) => {
        let changed: (() => void) | undefined;
        const off = state.onChange(() => changed?.());
        const aborted = (): void => changed?.();
        ctx.signal.addEventListener('abort', aborted);
        try {
          for (;;) {
            await send({ status: state.status(req.service) ?? ServingStatus.SERVICE_UNKNOWN });
            await new Promise<void>((r) => (changed = r));
            ctx.signal.throwIfAborted();
          }
        } finally {
          off();
          ctx.signal.removeEventListener('abort', aborted);
        }
      },
      true,
    ),
  };
}
