/**
 * Candidates of a job's DPA search scored on the server with the ONNX evaluator, for the parties whose evaluator is
 * ONNX: weights built tensor by tensor from the spooled delta. See docs/design/onnx-evaluator.md.
 */
import { FormatError } from '../../proto/errors.js';
import { decodeToF32, encodeFromF32 } from '../../proto/safetensors/dtype.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import type { OnnxEvaluator as OnnxSettings, SearchConfig } from '../../proto/gen/dppa/v1/jobs.js';
import type { StoredJob } from '../jobs/job-store.js';
import { accumulateTensor } from '../merge/tensor-merge.js';
import type { PartySpool } from '../uploads/spool.js';
import type { Metric } from './onnx/causal-lm-scorer.js';
import type { LoadedTask, OnnxEvaluator, WeightSource } from './onnx/index.js';
import type { Candidate, Scores } from './remote-evaluators.js';
import { onnxMetric } from './search-spec.js';

/** The ONNX evaluator of one job, shared by its parties (evaluations run one at a time). */
export class OnnxCandidates {
  private readonly tasks = new Map<string, Promise<LoadedTask[]>>();

  private constructor(
    private readonly settings: OnnxSettings,
    private readonly evaluator: OnnxEvaluator,
    private readonly base: Checkpoint,
    private readonly outsideByMax: boolean,
  ) {}

  /**
   * Opens the job's base checkpoint and its ONNX model.
   * @throws OnnxEvaluatorError subclasses for a model, tokenizer or provider problem; Error from the file system.
   */
  static async open(job: Pick<StoredJob, 'basePath' | 'dpa'>, search: SearchConfig): Promise<OnnxCandidates> {
    const settings = search.onnx!;
    // Loaded here rather than at the top: ONNX Runtime is a native library only these jobs need.
    const { OnnxEvaluator } = await import('./onnx/index.js');
    const base = await Checkpoint.open(job.basePath);
    try {
      const evaluator = await OnnxEvaluator.create({
        modelPath: settings.modelPath,
        checkpointShapes: Object.fromEntries(base.tensors().map((t) => [t.name, t.shape])),
        ...(settings.nameMapPath === '' ? {} : { nameMap: settings.nameMapPath }),
        ...(settings.tokenizerPath === '' ? {} : { tokenizerPath: settings.tokenizerPath }),
        ...(settings.provider === '' ? {} : { provider: settings.provider as 'cpu' | 'cuda' }),
      });
      return new OnnxCandidates(settings, evaluator, base, job.dpa.scaleOutsideByMax);
    } catch (err) {
      await base.close();
      throw err;
    }
  }

  /**
   * Checks at job creation everything the search will read for these parties:
   * the model against the base (and the name map), the tokenizer, the provider,
   * every task file (each example tokenized and fitted to the model), and each
   * party's fine-tuned reference (every weight the model takes, in the base's
   * shape). A job whose evaluator cannot run is refused rather than failing
   * once every party has uploaded.
   * @throws OnnxEvaluatorError subclasses naming the file (and line or tensor); FormatError naming a
   *   fine-tuned checkpoint that does not fit.
   */
  static async check(
    job: Pick<StoredJob, 'basePath' | 'dpa'>,
    search: SearchConfig,
    parties: readonly string[],
  ): Promise<void> {
    const c = await OnnxCandidates.open(job, search);
    try {
      for (const party of parties) {
        await c.partyTasks(party);
        await c.checkFinetuned(party);
      }
    } finally {
      await c.close();
    }
  }

  /** @throws FormatError if the party's fine-tuned checkpoint lacks a weight the model takes, or holds it in another shape. */
  private async checkFinetuned(party: string): Promise<void> {
    const path = this.settings.partyFinetuned[party]!;
    const ft = await Checkpoint.open(path);
    try {
      for (const name of this.evaluator.weightNames) {
        const want = this.base.info(name).shape;
        if (!ft.has(name))
          throw new FormatError('the fine-tuned reference lacks a weight the ONNX model takes', {
            file: path,
            tensor: name,
          });
        const got = ft.info(name).shape;
        if (got.join() !== want.join())
          throw new FormatError(
            `the fine-tuned reference has shape [${got.join(', ')}], the base [${want.join(', ')}]`,
            { file: path, tensor: name },
          );
      }
    } finally {
      await ft.close();
    }
  }

  /**
   * Scores a candidate of a party on the party's task files. With the
   * `log_likelihood` metric a task's score is `exp(mean log-likelihood)` (the
   * geometric mean of the answer tokens' probabilities), so that it is
   * positive and the Domain-Ratio's quotients mean "how much of the dense
   * model's likelihood is kept".
   * @throws OnnxEvaluatorError subclasses, SpooledTensorError for a damaged spool file, the signal's reason.
   */
  async score(party: string, spool: PartySpool, candidate: Candidate, signal: AbortSignal): Promise<Scores> {
    const tasks = await this.partyTasks(party);
    const metric: Metric = onnxMetric(this.settings);
    let weights: WeightSource;
    let close = (): Promise<void> => Promise.resolve();
    if (candidate.kind === 'dense') {
      const finetuned = await Checkpoint.open(this.settings.partyFinetuned[party]!);
      weights = (name) => finetuned.readF32(name, { signal });
      close = () => finetuned.close();
    } else {
      weights = this.amplified(party, spool, candidate.factors, signal);
    }
    try {
      const scores = await this.evaluator.evaluate(weights, tasks, metric, signal);
      return metric === 'log_likelihood'
        ? Object.fromEntries(Object.entries(scores).map(([t, s]) => [t, Math.exp(s)]))
        : scores;
    } finally {
      await close();
    }
  }

  /** Closes the model's session and the base checkpoint. */
  async close(): Promise<void> {
    await this.evaluator.close();
    await this.base.close();
  }

  private partyTasks(party: string): Promise<LoadedTask[]> {
    let loaded = this.tasks.get(party);
    if (loaded === undefined) {
      const specs = Object.entries(this.settings.partyTasks[party]?.tasks ?? {}).map(([name, file]) => ({
        name,
        file,
      }));
      loaded = this.evaluator.loadTasks(specs);
      this.tasks.set(party, loaded);
    }
    return loaded;
  }

  /** The candidate's tensors: base + amplified delta where the party sent the tensor, the base elsewhere. */
  private amplified(party: string, spool: PartySpool, factors: readonly number[], signal: AbortSignal): WeightSource {
    const files = new Map([...spool.held.values()].map((t) => [t.name, t.file]));
    return async (name) => {
      const info = this.base.info(name);
      const file = files.get(name);
      // A new array per tensor: the evaluator holds every weight of the candidate until its forward passes.
      const values = new Float32Array(info.numel);
      if (file === undefined) return this.base.readF32(name, { into: values, signal });
      const sum = await accumulateTensor(
        this.base,
        { name, contributions: [{ party, file, weight: 1, factors }], outsideByMax: this.outsideByMax },
        values,
        signal,
      );
      return info.dtype === 'F32' ? sum : decodeToF32(encodeFromF32(sum, info.dtype), info.dtype, sum);
    };
  }
}
