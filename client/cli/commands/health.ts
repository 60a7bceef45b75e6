import { text } from '../../../proto/cli/flag-table.js';
import { cancellable, defineCommand, note, out } from '../command.js';
import { EXIT } from '../exit-codes.js';
import { checkHealth } from '../../sdk/health.js';
import { DppaRpcError } from '../../sdk/errors.js';
import { inFlagTerms, onceServerFlags, transportOptions } from '../server-flags.js';

/** `dppa health`: see its help text. */
export const healthCommand = defineCommand({
  name: 'health',
  summary: 'check that a server serves (exit 0) or not (exit 1), for probes',
  usage: '--server HOST:PORT [--service NAME]',
  description: `Asks the server's standard gRPC health service (grpc.health.v1.Health/Check)
whether it serves, and prints the answer: SERVING, or NOT_SERVING while it
stops. Needs no token. Made for probes (a container's HEALTHCHECK).`,
  flags: {
    service: text('NAME', 'a service of the server, e.g. dppa.v1.UploadService (default: the whole server)'),
    ...onceServerFlags,
  },
  after: `Exit codes: 0 serving; 1 not serving, unknown service, unreachable or no answer
in time (the reason on stderr); 2 bad command line; 130 interrupted.`,
  async action(v) {
    const options = { ...transportOptions(v), ...(v.service === undefined ? {} : { service: v.service }) };
    let status: string;
    try {
      status = await cancellable((signal) => checkHealth(options, { signal }));
    } catch (err) {
      if (!(err instanceof DppaRpcError)) throw inFlagTerms(err);
      note(`dppa health: ${err.message}`);
      return EXIT.failure;
    }
    out(status);
    return status === 'SERVING' ? EXIT.ok : EXIT.failure;
  },
});
