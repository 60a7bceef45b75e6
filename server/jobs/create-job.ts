/**
 * Creating a job: checking its settings (and the files of a server-side
 * evaluator), opening its base checkpoint to fingerprint it, issuing party
 * tokens and storing it.
 */
import { newSecureRecord } from '../secure/secure-record.js';
import { mkdir, rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { FormatError } from '../../proto/errors.js';
import { baseFingerprint } from '../../proto/fingerprint.js';
import { JobState, type CreateJobRequest, type DpaConfig } from '../../proto/gen/dppa/v1/jobs.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { evaluatorOf, resolveOnnxFiles } from '../dpa/search-spec.js';
import { InvalidArgumentError, UnimplementedError } from '../errors.js';
import { newPartyToken, randomId } from '../tokens.js';
import type { Spool } from '../uploads/spool.js';
import type { JobEvents } from './job-events.js';
import { checkJobSettings } from './job-spec.js';
import type { JobStore, StoredJob } from './job-store.js';

/** Default per-party upload cap as a multiple of the base checkpoint's size: a dense fp32 delta of a bf16 base is 2×. */
const DEFAULT_UPLOAD_CAP_FACTOR = 4;

/** Where a new job goes. */
export interface CreateJobDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  /** Per-party upload cap; undefined for {@link DEFAULT_UPLOAD_CAP_FACTOR} × the base size. */
  maxUploadBytes: number | undefined;
  /** Whether a search can reach a party's remote evaluator: not on a cluster, where the DPA factor search runs with the ONNX evaluator only. */
  remoteEvaluators: boolean;
}

/**
 * Creates a job in state COLLECTING.
 * @returns The job and each party's token (never stored in clear).
 * @throws InvalidArgumentError naming the field at fault, including a base_path that is not a readable checkpoint
 *   and ONNX evaluator files that do not exist or that the evaluator cannot use (naming the file and the problem).
 * @throws UnimplementedError for settings this server does not offer yet.
 * @throws Error from the storage (a full disk: ENOSPC); nothing of the job is left then.
 */
export async function createJob(
  deps: CreateJobDeps,
  req: CreateJobRequest,
  signal: AbortSignal,
): Promise<{ job: StoredJob; tokens: Record<string, string> }> {
  const settings = checkJobSettings(req);
  const search = settings.dpa.search;
  const remote = search === undefined ? undefined : settings.parties.find((p) => evaluatorOf(search, p) === 'remote');
  if (!deps.remoteEvaluators && remote !== undefined) {
    throw new UnimplementedError(
      `dpa.search: party ${remote}: the remote evaluator is not available on a cluster (--cluster) yet; use the onnx evaluator, or an embedded server`,
    );
  }
  if (settings.dpa.search !== undefined)
    settings.dpa = { ...settings.dpa, search: await resolveOnnxFiles(settings.dpa.search, settings.parties) };
  const basePath = resolve(settings.basePath);
  const base = await openBase(basePath);
  let fingerprint: string;
  let baseBytes = 0;
  try {
    fingerprint = await baseFingerprint(base, { signal });
    for (const t of base.tensors()) baseBytes += t.byteLength;
  } finally {
    await base.close();
  }
  if (search !== undefined)
    await checkOnnxEvaluator(
      basePath,
      settings.dpa,
      settings.parties.filter((p) => evaluatorOf(search, p) === 'onnx'),
    );
  const tokens: Record<string, string> = {};
  const now = new Date().toISOString();
  const job: StoredJob = {
    id: randomId(9),
    label: settings.label,
    state: JobState.JOB_STATE_COLLECTING,
    basePath,
    baseFingerprint: fingerprint,
    baseBytes,
    rate: settings.rate,
    method: settings.method,
    dpa: settings.dpa,
    merge: settings.merge,
    parties: settings.parties.map((name) => {
      const { token, sha256 } = newPartyToken();
      tokens[name] = token;
      return { name, tokenSha256: sha256, joined: false };
    }),
    evaluations: [],
    maxUploadBytes: deps.maxUploadBytes ?? Math.max(1, DEFAULT_UPLOAD_CAP_FACTOR * baseBytes),
    maxAbsValue: settings.maxAbsValue,
    failureReason: '',
    createdAt: now,
    updatedAt: now,
    merged: undefined,
  };
  const sec = settings.secure;
  if (sec !== undefined)
    job.secure = newSecureRecord(job.id, job.parties.length, sec.threshold, sec.clipBound, sec.phaseSeconds);
  signal.throwIfAborted();
  const dir = deps.store.dir(job.id);
  try {
    await mkdir(dir, { recursive: true });
    await deps.events.load(job.id, dir);
    // Last: the stored job is what makes it exist (a folder without it is removed at the next start).
    await deps.store.create(job);
  } catch (err) {
    // A full disk (RESOURCE_EXHAUSTED) or a failing one (UNAVAILABLE) leaves nothing behind.
    await deps.events.unload(job.id);
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  deps.spool.addJob(job);
  return { job, tokens };
}

/**
 * Opens the job's ONNX evaluator as its search will and reads every file it needs ({@link OnnxCandidates.check}).
 * @throws InvalidArgumentError naming the file and the problem.
 */
async function checkOnnxEvaluator(basePath: string, dpa: DpaConfig, parties: readonly string[]): Promise<void> {
  if (parties.length === 0) return;
  // Loaded here rather than at the top: ONNX Runtime is a native library only these jobs need.
  const [{ OnnxCandidates }, { OnnxEvaluatorError }] = await Promise.all([
    import('../dpa/onnx-candidates.js'),
    import('../dpa/onnx/errors.js'),
  ]);
  try {
    await OnnxCandidates.check({ basePath, dpa }, dpa.search!, parties);
  } catch (err) {
    if (err instanceof OnnxEvaluatorError || err instanceof FormatError)
      throw new InvalidArgumentError(`dpa.search.onnx: ${err.message}`, { cause: err });
    throw err;
  }
}

async function openBase(basePath: string): Promise<Checkpoint> {
  try {
    return await Checkpoint.open(basePath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT')
      throw new InvalidArgumentError(`base_path: ${basePath} does not exist on the server`, { cause: err });
    if (err instanceof FormatError || code === 'EACCES' || code === 'EISDIR' || code === 'ENOTDIR') {
      throw new InvalidArgumentError(`base_path: ${basePath} is not a readable checkpoint: ${(err as Error).message}`, {
        cause: err,
      });
    }
    throw err;
  }
}
