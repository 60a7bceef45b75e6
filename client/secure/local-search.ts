/**
 * DPA at the party (secure jobs): the factor search run locally with the party's own evaluation, on the search code
 * the server runs (proto/algorithm), candidates built as in a federated search (base + Σ_p f_p·Δ|p, `applyDelta`).
 * Every evaluation is recorded in the working folder, so that a search run again resumes without scoring twice.
 */
import { mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  domainRatio,
  factorKey,
  memoised,
  searchDefaults,
  searchFactors,
  type FactorSearchOptions,
} from '../../proto/algorithm/index.js';
import { checkScores } from '../../proto/scores.js';
import { readDeltaHeader } from '../../proto/sparse/index.js';
import { applyDelta } from '../apply.js';
import { EvaluationError } from '../sdk/errors.js';
import { DEFAULT_EVALUATION_RETRIES, type EvaluateFn, type EvaluationCandidate } from '../sdk/evaluate.js';

/** What {@link searchLocally} searches. */
export interface LocalSearchOptions {
  /** Folder of the base checkpoint. */
  base: string;
  /** Folder of the party's fine-tuned checkpoint (the dense reference of the Domain-Ratio). */
  finetuned: string;
  /** The party's pruned `.dppa` delta; its partitions get one factor each. */
  delta: string;
  /** Working folder, created if missing: candidates go to `workDir/candidate`, the record to `workDir/search.json`. */
  workDir: string;
  /** Scores one candidate (the same callback as a federated search's). */
  evaluate: EvaluateFn;
  /** Search settings without `partitions` (taken from the delta); see `searchOptions` for a job's SearchConfig. */
  search: Omit<FactorSearchOptions, 'partitions'>;
  /** Scale outside tensors by the largest factor in candidates (the job's `scale_outside_by_max`). @default false */
  outsideByMax?: boolean;
  /** Attempts after the first when building or scoring a candidate fails. @default 2 */
  retries?: number;
  signal?: AbortSignal;
  /** Told of each candidate scored or answered from the record. */
  onProgress?: (e: LocalSearchEvent) => void;
}

/** Progress of a local search. */
export type LocalSearchEvent =
  | { type: 'evaluating'; candidate: EvaluationCandidate }
  | { type: 'scored'; candidate: EvaluationCandidate; scores: Record<string, number>; domainRatio: number }
  | { type: 'recorded'; candidate: EvaluationCandidate }
  | { type: 'retrying'; candidate: EvaluationCandidate; attempt: number; error: unknown };

/** The outcome of a local search. */
export interface LocalSearchResult {
  /** The chosen factors, partition 1 first. */
  factors: number[];
  /** Their Domain-Ratio. */
  domainRatio: number;
  /** Candidates the search visited (the dense reference not counted). */
  evaluations: number;
  /** Of which scored by this run (the others came from the record of an earlier run). */
  scoredNow: number;
  /** Scores of the dense fine-tuned model. */
  dense: Record<string, number>;
}

interface RecordedEvaluation {
  factors: number[];
  scores: Record<string, number>;
  domainRatio: number;
}

/** `workDir/search.json`: the evaluations of one search of one delta. */
interface SearchRecord {
  version: 1;
  /** What the record is valid for: the delta (header, size) and the settings. */
  identity: string;
  dense?: Record<string, number>;
  evaluations: RecordedEvaluation[];
}

/** The record file of a working folder. */
export function searchRecordPath(workDir: string): string {
  return join(workDir, 'search.json');
}

async function loadRecord(path: string, identity: string): Promise<SearchRecord> {
  const fresh: SearchRecord = { version: 1, identity, evaluations: [] };
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    return fresh;
  }
  try {
    const r = JSON.parse(text) as SearchRecord;
    // Another delta or other settings: their scores say nothing of this search.
    return r.version === 1 && r.identity === identity && Array.isArray(r.evaluations) ? r : fresh;
  } catch {
    return fresh;
  }
}

async function saveRecord(path: string, record: SearchRecord): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, JSON.stringify(record));
  await rename(tmp, path);
}

/**
 * Runs (or resumes) a party's factor search locally: scores the dense fine-tuned model, then each candidate
 * `searchFactors` asks for, built into `workDir/candidate`; the score is the Domain-Ratio.
 * @throws EvaluationError when building or scoring a candidate failed on every attempt (what was scored is kept
 *   in the record); RangeError for bad settings or scores without a usable task; FormatError for a bad delta;
 *   the signal's reason.
 */
export async function searchLocally(o: LocalSearchOptions): Promise<LocalSearchResult> {
  const header = await readDeltaHeader(o.delta, o.signal === undefined ? {} : { signal: o.signal });
  const partitions = header.levels.length;
  const options: FactorSearchOptions = { ...o.search, partitions };
  searchDefaults(options);
  const outsideByMax = o.outsideByMax ?? false;
  const identity = JSON.stringify({
    base: header.baseFingerprint,
    levels: header.levels,
    rate: header.rate,
    size: (await stat(o.delta)).size,
    search: searchDefaults(options),
    outsideByMax,
  });
  await mkdir(o.workDir, { recursive: true });
  const recordPath = searchRecordPath(o.workDir);
  const record = await loadRecord(recordPath, identity);
  const attempts = 1 + (o.retries ?? DEFAULT_EVALUATION_RETRIES);
  const signal = o.signal ?? new AbortController().signal;

  const scoreOnce = async (candidate: EvaluationCandidate): Promise<Record<string, number>> => {
    for (let attempt = 1; ; attempt++) {
      try {
        let modelDir = o.finetuned;
        if (candidate.kind === 'amplified') {
          modelDir = join(o.workDir, 'candidate');
          await applyDelta({
            base: o.base,
            delta: o.delta,
            out: modelDir,
            factors: candidate.factors,
            outsideByMax,
            overwrite: true,
            signal,
          });
        }
        return checkScores(await o.evaluate(modelDir, candidate, signal));
      } catch (err) {
        if (signal.aborted) throw signal.reason;
        const what =
          candidate.kind === 'dense' ? 'the dense fine-tuned model' : `factors [${candidate.factors.join(', ')}]`;
        const message = `evaluating ${what} failed: ${err instanceof Error ? err.message : String(err)}`;
        if (attempt >= attempts) {
          const suffix = attempts > 1 ? ` (attempt ${attempts} of ${attempts})` : '';
          throw new EvaluationError(candidate, message + suffix, { cause: err });
        }
        o.onProgress?.({ type: 'retrying', candidate, attempt: attempt + 1, error: err });
      }
    }
  };

  let dense = record.dense;
  if (dense === undefined) {
    const candidate: EvaluationCandidate = { kind: 'dense', factors: [] };
    o.onProgress?.({ type: 'evaluating', candidate });
    const scores = await scoreOnce(candidate);
    // Fails here, before any candidate, when no task can give a ratio (every dense score 0).
    domainRatio(scores, scores);
    record.dense = dense = scores;
    await saveRecord(recordPath, record);
    o.onProgress?.({ type: 'scored', candidate, scores, domainRatio: 1 });
  }
  const reference = dense;
  const known = new Map(record.evaluations.map((e) => [factorKey(e.factors), e.domainRatio]));
  let scoredNow = 0;
  const score = memoised(
    known,
    async (factors) => {
      const candidate: EvaluationCandidate = { kind: 'amplified', factors };
      o.onProgress?.({ type: 'evaluating', candidate });
      const scores = await scoreOnce(candidate);
      const ratio = domainRatio(scores, reference);
      record.evaluations.push({ factors, scores, domainRatio: ratio });
      await saveRecord(recordPath, record);
      scoredNow++;
      o.onProgress?.({ type: 'scored', candidate, scores, domainRatio: ratio });
      return ratio;
    },
    () => undefined,
  );
  const counted: typeof score = async (factors, s) => {
    if (known.has(factorKey(factors))) o.onProgress?.({ type: 'recorded', candidate: { kind: 'amplified', factors } });
    return score(factors, s);
  };
  const result = await searchFactors(options, counted, signal);
  return {
    factors: result.factors,
    domainRatio: result.score,
    evaluations: result.evaluations,
    scoredNow,
    dense: reference,
  };
}
