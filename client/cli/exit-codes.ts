/**
 * Exit codes of the `dppa` command, and the one place that turns an error into
 * a message and a code.
 *
 * | code | meaning |
 * | ---- | ------- |
 * | 0 | success |
 * | 1 | unexpected failure (a bug: the message says so) |
 * | 2 | bad command line |
 * | 3 | bad input data: an input path (`--base`, `--delta`, …) does not exist, a checkpoint or delta file is malformed, base and fine-tuned do not match, or a delta does not fit its job |
 * | 4 | the server refused or failed the request (any gRPC error, with the server's message), the job is in the wrong state, or a download did not verify |
 * | 5 | the party's evaluation command (`--eval-cmd`) kept failing; the server stops this party's search with its message (`dppa evaluate` resumes it) |
 * | 130 | interrupted (Ctrl-C) |
 */
import { InputPathError, UsageError } from '../../proto/cli/flag-table.js';
import { FormatError } from '../../proto/errors.js';
import { CheckpointMismatchError } from '../prune/delta-source.js';
import {
  DeltaMismatchError,
  DownloadError,
  DppaRpcError,
  EvaluationError,
  JobStateError,
  UploadIncompleteError,
  isServiceError,
} from '../sdk/errors.js';

export const EXIT = { ok: 0, failure: 1, usage: 2, data: 3, server: 4, evaluation: 5, interrupted: 130 } as const;

export { InputPathError, UsageError };

/** The code and the message to print for an error. */
export function describeFailure(err: unknown): { code: number; message: string } {
  if (err instanceof UsageError || err instanceof RangeError) return { code: EXIT.usage, message: err.message };
  if (
    err instanceof InputPathError ||
    err instanceof FormatError ||
    err instanceof CheckpointMismatchError ||
    err instanceof DeltaMismatchError
  )
    return { code: EXIT.data, message: err.message };
  if (err instanceof EvaluationError)
    return {
      code: EXIT.evaluation,
      message: `${err.message} (this party's search stopped with this reason; the other parties' work is kept: fix the command and run dppa evaluate to resume)`,
    };
  if (err instanceof DppaRpcError) return { code: EXIT.server, message: rpcMessage(err) };
  if (isServiceError(err))
    return { code: EXIT.server, message: rpcMessage(new DppaRpcError('call', err.code, err.details)) };
  if (err instanceof JobStateError || err instanceof UploadIncompleteError || err instanceof DownloadError)
    return { code: EXIT.server, message: err.message };
  if (err instanceof Error && err.name === 'AbortError') return { code: EXIT.interrupted, message: 'interrupted' };
  if (err instanceof Error && (err as NodeJS.ErrnoException).code === 'ENOENT')
    return { code: EXIT.data, message: err.message };
  const detail = err instanceof Error ? (err.stack ?? err.message) : String(err);
  return { code: EXIT.failure, message: `unexpected error (please report it):\n${detail}` };
}

/** The server's message, with a hint where the status has an obvious cause on the caller's side. */
function rpcMessage(err: DppaRpcError): string {
  switch (err.codeName) {
    case 'UNAUTHENTICATED':
      return `${err.message}; check the token (--token, --admin-token-file, DPPA_TOKEN, DPPA_ADMIN_TOKEN)`;
    case 'PERMISSION_DENIED':
      return `${err.message}; this token may not do that (the admin token is needed, or a token of this party)`;
    case 'UNAVAILABLE':
      return `${err.message}; is the server running and reachable at --server (and does it speak TLS if you asked for it)?`;
    default:
      return err.message;
  }
}
