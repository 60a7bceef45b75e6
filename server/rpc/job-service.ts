/**
 * JobService: thin handlers that check the caller, call the job modules and
 * encode the answer.
 */
import { JobState, type JobServiceServer } from '../../proto/gen/dppa/v1/jobs.js';
import { FailedPreconditionError } from '../errors.js';
import { createJob } from '../jobs/create-job.js';
import type { JobEvents } from '../jobs/job-events.js';
import type { JobRunner } from '../jobs/job-runner.js';
import type { JobStore } from '../jobs/job-store.js';
import type { Spool } from '../uploads/spool.js';
import type { Authenticator } from './auth.js';
import type { RpcWrapper } from './handler.js';
import { jobView } from './job-view.js';

/** What the job service needs. */
export interface JobServiceDeps {
  store: JobStore;
  events: JobEvents;
  spool: Spool;
  runner: JobRunner;
  auth: Authenticator;
  /** Per-party upload cap of new jobs; undefined for the default multiple of the base size. */
  maxUploadBytes: number | undefined;
  /** Whether a search can reach a party's remote evaluator (jobs using one are refused otherwise). */
  remoteEvaluators: boolean;
}

/** The JobService implementation. */
export function jobService(deps: JobServiceDeps, rpc: RpcWrapper): JobServiceServer {
  const { store, events, spool, runner, auth } = deps;
  return {
    createJob: rpc.unary('dppa.v1.JobService/CreateJob', async (req, ctx) => {
      auth.requireAdmin(ctx.metadata);
      const { job, tokens } = await createJob(deps, req, ctx.signal);
      return { job: jobView(job, await spool.ofJob(job.id), runner.pause(job.id)), tokens };
    }),
    getJob: rpc.unary('dppa.v1.JobService/GetJob', async (req, ctx) => {
      auth.requireJobAccess(ctx.metadata, req.jobId);
      const job = store.get(req.jobId);
      return jobView(job, await spool.ofJob(job.id), runner.pause(job.id));
    }),
    listJobs: rpc.unary('dppa.v1.JobService/ListJobs', async (_req, ctx) => {
      auth.requireAdmin(ctx.metadata);
      const jobs = [];
      for (const j of store.list()) jobs.push(jobView(j, await spool.ofJob(j.id), runner.pause(j.id)));
      return { jobs };
    }),
    watchJob: rpc.serverStream(
      'dppa.v1.JobService/WatchJob',
      async (req, send, ctx) => {
        auth.requireJobAccess(ctx.metadata, req.jobId);
        store.get(req.jobId);
        for await (const event of events.watch(req.jobId, req.afterSeq, ctx.signal)) await send(event);
      },
      true,
    ),
    cancelJob: rpc.unary('dppa.v1.JobService/CancelJob', async (req, ctx) => {
      auth.requireAdmin(ctx.metadata);
      if (store.get(req.jobId).state === JobState.JOB_STATE_MERGED) {
        throw new FailedPreconditionError(`job ${req.jobId} has already merged; there is nothing to cancel`);
      }
      const reason = req.reason.trim() === '' ? 'cancelled by the admin' : req.reason;
      const job = await runner.cancel(req.jobId, reason);
      return jobView(job, await spool.ofJob(job.id), undefined);
    }),
    resumeJob: rpc.unary('JobService/ResumeJob', async (req, ctx) => {
      auth.requireAdmin(ctx.metadata);
      const job = runner.resumeJob(req.jobId);
      return jobView(job, await spool.ofJob(job.id), runner.pause(job.id));
    }),
  };
}
