/**
 * `dppa serve`: runs the aggregation server until SIGTERM or SIGINT, then
 * stops it gracefully (a second signal stops it at once).
 *
 * Once both listeners are up it prints, on stdout:
 *   grpc listening on HOST:PORT
 *   metrics listening on http://HOST:PORT/metrics
 */
import { parseArgs } from 'node:util';
import { optionsFromFlags, type ServeFlags } from './config.js';
import { ConfigError } from './errors.js';
import { DppaServer } from './server.js';

const HELP = `Usage: dppa serve [options]

Runs the DPPA aggregation server: jobs, party uploads, the DPA factor search
(with the parties' evaluations or an ONNX model), merge, downloads (gRPC), and
Prometheus metrics (HTTP).

Options:
  --data DIR               state folder: jobs, uploads, merged checkpoints (default ./dppa-data)
  --grpc-host HOST         interface to listen on (default 127.0.0.1)
  --grpc-port N            gRPC port; 0 picks a free one (default 50051)
  --metrics-port N         port of http://HOST:N/metrics; 0 picks a free one (default 9464)
  --admin-token-file F     file whose first line is the admin token
                           (otherwise the DPPA_ADMIN_TOKEN environment variable; one is required)
  --tls-cert F --tls-key F serve gRPC over TLS with this PEM certificate chain and key
  --tls-client-ca F        require client certificates signed by this PEM CA (mutual TLS)
  --insecure               allow plaintext gRPC on a non-loopback host
  --max-upload-bytes N     most bytes one party may upload to one job
                           (default 4 × the job's base checkpoint size)
  --keep-uploads           keep the parties' uploaded tensors once their job has merged
                           (default: deleted then; the merged checkpoint stays)
  --nats URL               also publish every job event to NATS JetStream on
                           dppa.jobs.<job>.<event> (docs/events.md); the server does not
                           start while NATS is unreachable (default: DPPA_NATS_URL, else none)
  --nats-creds F           NATS credentials file (user JWT and NKey seed)
  --cluster                run as one replica of a cluster on --nats (docs/scale-out.md):
                           jobs, events, merge and search tasks shared on JetStream; --data must
                           be the same shared folder on every replica (default: DPPA_CLUSTER)
  --task-ack-wait-ms N     with --cluster: a task of a replica that died goes to another
                           one after N ms without news (default 30000)
  -h, --help               show this help

Plaintext gRPC is only allowed on a loopback host unless --insecure is given.
SIGTERM or SIGINT stops the server gracefully; a second one stops it at once.
Exit codes: 0 stopped cleanly, 1 unexpected failure, 2 bad command line or configuration.`;

/** Exit codes, as the client's CLI uses them. */
const EXIT = { ok: 0, failure: 1, usage: 2 } as const;

/**
 * Runs `dppa serve` with `argv` (with or without the leading `serve`).
 * @returns The exit code, once the server has stopped.
 */
export async function main(argv: string[]): Promise<number> {
  const args = argv[0] === 'serve' ? argv.slice(1) : argv;
  let server: DppaServer;
  try {
    const { values } = parseArgs({
      args,
      strict: true,
      options: {
        data: { type: 'string' },
        'grpc-host': { type: 'string' },
        'grpc-port': { type: 'string' },
        'metrics-port': { type: 'string' },
        'admin-token-file': { type: 'string' },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        'tls-client-ca': { type: 'string' },
        insecure: { type: 'boolean' },
        'max-upload-bytes': { type: 'string' },
        'keep-uploads': { type: 'boolean' },
        nats: { type: 'string' },
        'nats-creds': { type: 'string' },
        cluster: { type: 'boolean' },
        'task-ack-wait-ms': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
    if (values.help === true) {
      process.stdout.write(`${HELP}\n`);
      return EXIT.ok;
    }
    const flags: ServeFlags = {
      data: values.data,
      grpcHost: values['grpc-host'],
      grpcPort: values['grpc-port'],
      metricsPort: values['metrics-port'],
      adminTokenFile: values['admin-token-file'],
      tlsCert: values['tls-cert'],
      tlsKey: values['tls-key'],
      tlsClientCa: values['tls-client-ca'],
      insecure: values.insecure,
      maxUploadBytes: values['max-upload-bytes'],
      keepUploads: values['keep-uploads'],
      nats: values.nats,
      natsCreds: values['nats-creds'],
      cluster: values.cluster,
      taskAckWaitMs: values['task-ack-wait-ms'],
    };
    server = new DppaServer(await optionsFromFlags(flags));
  } catch (err) {
    const usage = err instanceof ConfigError || (err as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS') === true;
    if (!usage) throw err;
    process.stderr.write(`dppa serve: ${(err as Error).message}\n(see dppa serve --help)\n`);
    return EXIT.usage;
  }

  try {
    await server.start();
  } catch (err) {
    process.stderr.write(`dppa serve: cannot start: ${(err as Error).message}\n`);
    return EXIT.failure;
  }
  const host = server.host.includes(':') ? `[${server.host}]` : server.host;
  process.stdout.write(`grpc listening on ${host}:${server.grpcPort}\n`);
  process.stdout.write(`metrics listening on http://${host}:${server.metricsPort}/metrics\n`);
  return untilStopped(server);
}

/** Stops the server on SIGTERM/SIGINT (gracefully the first time, at once the second) and resolves to the exit code. */
async function untilStopped(server: DppaServer): Promise<number> {
  let signals = 0;
  let onSignal: ((sig: NodeJS.Signals) => void) | undefined;
  try {
    return await new Promise<number>((resolve) => {
      onSignal = (sig) => {
        signals++;
        process.stderr.write(`dppa serve: ${sig}, ${signals === 1 ? 'stopping (send it again to stop at once)' : 'stopping at once'}\n`);
        server.stop({ graceful: signals === 1 }).then(
          () => resolve(EXIT.ok),
          (err: unknown) => {
            process.stderr.write(`dppa serve: stop failed: ${String(err)}\n`);
            resolve(EXIT.failure);
          },
        );
      };
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
    });
  } finally {
    if (onSignal !== undefined) {
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
    }
  }
}
