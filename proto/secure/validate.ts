/**
 * Checks shared by the party and the server on job parameters and rosters.
 */
import { ProtocolStateError, TooFewSurvivorsError } from './errors.js';
import type { KeyAdvertisement, SecureJob } from './messages.js';
import { KEY_BYTES } from './x25519.js';

/** @throws ProtocolStateError unless 2 ≤ threshold ≤ parties and the job id is set */
export function checkJob(job: SecureJob): void {
  if (job.jobId === '') throw new ProtocolStateError('jobId: empty');
  if (!Number.isInteger(job.parties) || job.parties < 2)
    throw new ProtocolStateError(`parties: expected an integer ≥ 2, got ${job.parties}`);
  if (!Number.isInteger(job.threshold) || job.threshold < 2 || job.threshold > job.parties) {
    throw new ProtocolStateError(`threshold: expected an integer in [2, ${job.parties}], got ${job.threshold}`);
  }
}

/** @throws ProtocolStateError unless `index` is a party of the job */
export function checkIndex(job: SecureJob, index: number, what: string): void {
  if (!Number.isInteger(index) || index < 1 || index > job.parties)
    throw new ProtocolStateError(`${what}: no party ${index} in this job`);
}

/** @throws ProtocolStateError for a bad key advertisement */
export function checkAdvertisement(job: SecureJob, ad: KeyAdvertisement): void {
  checkIndex(job, ad.index, 'key advertisement');
  if (ad.maskPublicKey.length !== KEY_BYTES || ad.sharePublicKey.length !== KEY_BYTES) {
    throw new ProtocolStateError(`key advertisement of party ${ad.index}: keys must be ${KEY_BYTES} bytes`);
  }
}

/** @throws TooFewSurvivorsError if fewer than the threshold are left for `phase` */
export function checkEnough(job: SecureJob, phase: string, have: number): void {
  if (have < job.threshold) throw new TooFewSurvivorsError(phase, have, job.threshold);
}

/** Whether two byte arrays hold the same bytes. */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}
