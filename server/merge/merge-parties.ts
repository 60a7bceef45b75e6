/** The parties of a job as the merge takes them, from the job and its spools, and what each adds to a tensor. */
import { join } from 'node:path';
import { carriesFinetuned } from '../../proto/sparse/index.js';
import { SECURE_SUM, secureSumFiles } from '../secure/secure-sum.js';
import { partyFactors, partyWeight } from '../jobs/job-spec.js';
import type { StoredJob } from '../jobs/job-store.js';
import type { Spool } from '../uploads/spool.js';
import { SpooledTensorError, type Contribution } from './tensor-merge.js';

/** One party's contribution. */
export interface MergeParty {
  name: string;
  /** Weight c_i of the party's delta. */
  weight: number;
  /** Amplification factor per partition, partition 1 first. */
  factors: readonly number[];
  /** Spool file (a one-tensor `.dppa` file) of every tensor the party sent, by tensor name. */
  tensors: ReadonlyMap<string, string>;
  /** The party sent fine-tuned weights, not deltas. @default unknown: it may */
  finetuned?: boolean;
}

/**
 * The parties of a job as the merge takes them: in the job's order, with weight, factors and spooled tensors; for
 * a secure job, its unmasked sum (server/secure/secure-sum.ts).
 * @param jobDir - The job's folder (a secure job's sum is there).
 * @throws SpooledTensorError for a tensor planned but not held (dropped by a send-back cut short): a merge must never leave out a tensor;
 *   Error if a party has no upload.
 */
export function mergeParties(job: StoredJob, spool: Spool, jobDir: string): MergeParty[] {
  // A secure job's one contribution: the unmasked sum of its survivors, weights and factors applied at the parties.
  if (job.secure !== undefined) return [{ name: SECURE_SUM, weight: 1, factors: [1], tensors: secureSumFiles(jobDir) }];
  return job.parties.map(({ name }) => {
    const s = spool.party(job.id, name);
    if (s.header === undefined) throw new Error(`party ${name} has sent nothing`);
    const missing = s.header.tensors.findIndex((t) => t.sent && !s.held.has(t.name));
    if (missing >= 0) {
      const file = join(s.dir, `${missing}.dppa`);
      const tensor = s.header.tensors[missing]!.name;
      throw new SpooledTensorError(name, `${file}, tensor "${tensor}": the spool file is gone`, file, tensor);
    }
    const factors = partyFactors(job, name, s.header.levels.length);
    if (factors === undefined) throw new Error(`party ${name} has no factors`);
    return {
      name,
      weight: partyWeight(job, name),
      factors,
      tensors: new Map([...s.held.values()].map((t) => [t.name, t.file])),
      finetuned: carriesFinetuned(s.header),
    };
  });
}

/** The parties' entries of one tensor, in the parties' order: what a tensor merge adds to the base. */
export function contributionsTo(tensor: string, parties: readonly MergeParty[]): Contribution[] {
  return parties.flatMap((p) => {
    const file = p.tensors.get(tensor);
    if (file === undefined) return [];
    const c: Contribution = { party: p.name, file, weight: p.weight, factors: [...p.factors] };
    return [p.finetuned === undefined ? c : { ...c, finetuned: p.finetuned }];
  });
}
