/**
 * The server-side ONNX evaluator: scores one candidate set of weights on a party's validation tasks with ONNX
 * Runtime. Contract: docs/onnx-evaluator.md; reasons: docs/design/onnx-evaluator.md.
 */
import * as ort from 'onnxruntime-node';
import { f16ToF32, f32ToF16 } from '../../../proto/safetensors/dtype.js';
import { checkTask, scoreTask, METRICS, type ForwardFn, type Metric } from './causal-lm-scorer.js';
import { OnnxEvaluatorError, OnnxModelError, ProviderUnavailableError } from './errors.js';
import {
  checkNameMap,
  encodeWithWeightInputs,
  encodeWithWeightValues,
  inlineExternalData,
  loadNameMap,
  planWeights,
  readModel,
  type CheckpointShapes,
  type NameMap,
  type WeightSlot,
} from './model-weights.js';
import { DataType, dataTypeName, int64, type IValueInfoProto, type ModelProto } from './onnx-schema.js';
import { loadTasks, type LoadedTask, type TaskSpec } from './tasks.js';
import { loadTokenizer, type Tokenizer } from './tokenizer.js';

/** Where ONNX Runtime runs the model. */
export type OrtProvider = 'cpu' | 'cuda';

/**
 * How candidate weights get into the model.
 * - `inputs`: weights are fed as graph inputs with every run; one session for all candidates.
 * - `rewrite`: the weights' initializers are rewritten in memory; one session per candidate (needed for BFLOAT16 weights).
 * - `auto`: `inputs` unless a weight is BFLOAT16.
 */
export type Injection = 'auto' | 'inputs' | 'rewrite';

/** Returns the candidate value of a checkpoint tensor, float32, row-major in the checkpoint's shape. */
export type WeightSource = (checkpointName: string) => Promise<Float32Array>;

/** Settings of an {@link OnnxEvaluator}. */
export interface OnnxEvaluatorOptions {
  /** The ONNX model (see docs/onnx-evaluator.md for the contract). */
  modelPath: string;
  /**
   * Checkpoint tensor name → initializer (or graph input) name, or the path of a
   * JSON file holding that object. @default identical names
   */
  nameMap?: string | NameMap;
  /**
   * Shapes of the checkpoint's tensors (for instance from the base's safetensors
   * header). Recommended: tells weights from constants, and checks shapes when
   * the evaluator is created rather than when a candidate arrives.
   */
  checkpointShapes?: CheckpointShapes;
  /** Tokenizer description (JSON). Required for text tasks, not for tasks given as token ids. */
  tokenizerPath?: string;
  /** Graph input holding the token ids (int64 or int32, `[batch, seq]`). @default 'input_ids' */
  inputName?: string;
  /** Graph output holding the logits (float, `[batch, seq, vocab]`). @default 'logits' */
  outputName?: string;
  /** Execution provider. `cuda` needs ONNX Runtime's CUDA binaries installed by the user. @default 'cpu' */
  provider?: OrtProvider;
  /** Most sequences per forward pass. @default 32 */
  batchSize?: number;
  /** Longest sequence the model takes; longer examples keep their last tokens. @default no limit */
  maxSequence?: number;
  /** @default 'auto' */
  injection?: Injection;
  /** Largest logits tensor of one forward pass, in bytes (the batch shrinks for long sequences). @default 268435456 (256 MiB) */
  maxLogitsBytes?: number;
  /** ONNX Runtime intra-op threads. @default ONNX Runtime's choice (one per physical core) */
  intraOpThreads?: number;
}

interface Resolved {
  modelPath: string;
  nameMap: string | NameMap | undefined;
  checkpointShapes: CheckpointShapes | undefined;
  tokenizerPath: string | undefined;
  inputName: string;
  outputName: string;
  provider: OrtProvider;
  batchSize: number;
  maxSequence: number | undefined;
  injection: Injection;
  maxLogitsBytes: number;
  intraOpThreads: number | undefined;
}

/**
 * Fills in defaults and checks the settings.
 * @throws RangeError or TypeError naming the setting.
 */
export function evaluatorDefaults(o: OnnxEvaluatorOptions): Resolved {
  const r: Resolved = {
    modelPath: o.modelPath,
    nameMap: o.nameMap,
    checkpointShapes: o.checkpointShapes,
    tokenizerPath: o.tokenizerPath,
    inputName: o.inputName ?? 'input_ids',
    outputName: o.outputName ?? 'logits',
    provider: o.provider ?? 'cpu',
    batchSize: o.batchSize ?? 32,
    maxSequence: o.maxSequence,
    injection: o.injection ?? 'auto',
    maxLogitsBytes: o.maxLogitsBytes ?? 256 * 1024 * 1024,
    intraOpThreads: o.intraOpThreads,
  };
  if (typeof r.modelPath !== 'string' || r.modelPath === '') throw new TypeError('modelPath: must be a file path');
  if (r.provider !== 'cpu' && r.provider !== 'cuda')
    throw new RangeError(`provider: expected cpu or cuda, got ${String(r.provider)}`);
  if (!['auto', 'inputs', 'rewrite'].includes(r.injection))
    throw new RangeError(`injection: expected auto, inputs or rewrite, got ${String(r.injection)}`);
  if (!Number.isInteger(r.batchSize) || r.batchSize < 1)
    throw new RangeError(`batchSize: must be a positive integer, got ${r.batchSize}`);
  if (r.maxSequence !== undefined && (!Number.isInteger(r.maxSequence) || r.maxSequence < 1))
    throw new RangeError(`maxSequence: must be a positive integer, got ${r.maxSequence}`);
  if (!(r.maxLogitsBytes > 0)) throw new RangeError(`maxLogitsBytes: must be positive, got ${r.maxLogitsBytes}`);
  if (r.intraOpThreads !== undefined && (!Number.isInteger(r.intraOpThreads) || r.intraOpThreads < 1))
    throw new RangeError(`intraOpThreads: must be a positive integer, got ${r.intraOpThreads}`);
  return r;
}

/** Graph inputs besides the token ids that the evaluator knows how to fill. */
type ExtraInput = { name: string; kind: 'attention_mask' | 'position_ids'; int32: boolean };

/** Logits of one batch, as returned by {@link OnnxEvaluator.logits}. */
export interface LogitsResult {
  /** `[batch, seq, vocab]` row-major. */
  data: Float32Array;
  dims: [batch: number, seq: number, vocab: number];
}

function isLoaded(t: TaskSpec | LoadedTask): t is LoadedTask {
  return 'examples' in t;
}

/**
 * Scores candidate weights of a causal language model on validation tasks with
 * ONNX Runtime (onnxruntime-node).
 *
 * Calls to {@link evaluate} are run one at a time (each already uses all cores),
 * so a server may call it from several searches without holding several
 * candidates' weights in memory at once.
 */
export class OnnxEvaluator {
  /** How weights are injected, as detected (or forced by the `injection` option). */
  readonly injection: 'inputs' | 'rewrite';
  /** The checkpoint tensors {@link evaluate} asks the weight source for, in the order it asks. */
  readonly weightNames: readonly string[];
  /** Checkpoint tensors (from `checkpointShapes`) that the model does not take, such as a tied `lm_head.weight`. */
  readonly unmatched: readonly string[];
  /** The tokenizer, if `tokenizerPath` was given. */
  readonly tokenizer: Tokenizer | undefined;

  readonly #o: Resolved;
  readonly #model: ModelProto;
  readonly #slots: readonly WeightSlot[];
  readonly #extras: readonly ExtraInput[];
  readonly #int32Ids: boolean;
  readonly #vocabSize: number | undefined;
  readonly #sessionOptions: ort.InferenceSession.SessionOptions;
  /** The one session of `inputs` injection. */
  #session: ort.InferenceSession | undefined;
  #tail: Promise<unknown> = Promise.resolve();
  #closed = false;

  private constructor(init: {
    o: Resolved;
    model: ModelProto;
    slots: WeightSlot[];
    unmatched: string[];
    extras: ExtraInput[];
    int32Ids: boolean;
    vocabSize: number | undefined;
    injection: 'inputs' | 'rewrite';
    tokenizer: Tokenizer | undefined;
    sessionOptions: ort.InferenceSession.SessionOptions;
    session: ort.InferenceSession | undefined;
  }) {
    this.#o = init.o;
    this.#model = init.model;
    this.#slots = init.slots;
    this.#extras = init.extras;
    this.#int32Ids = init.int32Ids;
    this.#vocabSize = init.vocabSize;
    this.#sessionOptions = init.sessionOptions;
    this.#session = init.session;
    this.injection = init.injection;
    this.weightNames = init.slots.map((s) => s.checkpoint);
    this.unmatched = init.unmatched;
    this.tokenizer = init.tokenizer;
  }

  /**
   * Reads the model, maps its weights and opens the ONNX Runtime session.
   * @throws RangeError or TypeError for a bad option.
   * @throws OnnxModelError if the model does not follow the contract.
   * @throws ProviderUnavailableError if `provider` is `cuda` and ONNX Runtime's CUDA provider is not installed.
   * @throws TokenizerError for a bad tokenizer description.
   */
  static async create(opts: OnnxEvaluatorOptions): Promise<OnnxEvaluator> {
    const o = evaluatorDefaults(opts);
    const file = o.modelPath;
    const model = await readModel(file);
    const graph = model.graph!;
    const inits = new Set((graph.initializer ?? []).map((t) => t.name ?? ''));
    const inputs = new Map((graph.input ?? []).map((v) => [v.name ?? '', v]));
    const outputs = new Map((graph.output ?? []).map((v) => [v.name ?? '', v]));

    const ids = inputs.get(o.inputName);
    if (ids === undefined || inits.has(o.inputName)) {
      throw new OnnxModelError(
        `the model has no input "${o.inputName}" (inputs: ${[...inputs.keys()].filter((n) => !inits.has(n)).join(', ') || 'none'}); set inputName`,
        { file },
      );
    }
    const idType = ids.type?.tensorType?.elemType;
    if (idType !== DataType.INT64 && idType !== DataType.INT32)
      throw new OnnxModelError(
        `input "${o.inputName}" has dtype ${dataTypeName(idType)}; token ids must be INT64 or INT32`,
        { file },
      );
    checkDynamic(ids, o.inputName, file);
    const logits = outputs.get(o.outputName);
    if (logits === undefined)
      throw new OnnxModelError(
        `the model has no output "${o.outputName}" (outputs: ${[...outputs.keys()].join(', ') || 'none'}); set outputName`,
        { file },
      );
    const vocabDim = logits.type?.tensorType?.shape?.dim?.[2];
    const vocabSize = vocabDim?.dimValue != null && vocabDim.dimParam == null ? int64(vocabDim.dimValue) : undefined;

    const reserved = new Set([o.inputName, 'attention_mask', 'position_ids']);
    const nameMap = typeof o.nameMap === 'string' ? await loadNameMap(o.nameMap) : o.nameMap;
    if (nameMap !== undefined && typeof o.nameMap !== 'string') checkNameMap(nameMap);
    const { slots, unmatched } = planWeights(model, { file, nameMap, checkpointShapes: o.checkpointShapes, reserved });
    if (slots.length === 0)
      throw new OnnxModelError('no tensor of the model is a checkpoint weight: check nameMap or checkpointShapes', {
        file,
      });

    // Graph inputs that are neither weights nor token ids must be ones the evaluator can fill.
    const slotNames = new Set(slots.map((s) => s.graphName));
    const extras: ExtraInput[] = [];
    for (const [name, v] of inputs) {
      if (name === o.inputName || inits.has(name) || slotNames.has(name)) continue;
      const t = v.type?.tensorType?.elemType;
      if ((name === 'attention_mask' || name === 'position_ids') && (t === DataType.INT64 || t === DataType.INT32)) {
        extras.push({ name, kind: name, int32: t === DataType.INT32 });
        continue;
      }
      throw new OnnxModelError(
        `graph input "${name}" is neither "${o.inputName}", attention_mask, position_ids nor a checkpoint weight; the evaluator cannot fill it`,
        { file, tensor: name },
      );
    }

    const bf16 = slots.find((s) => s.dtype === 'bfloat16');
    if (o.injection === 'inputs' && bf16 !== undefined) {
      throw new OnnxModelError(
        `"${bf16.graphName}" is BFLOAT16, which ONNX Runtime's JavaScript API cannot feed; use injection "rewrite" or "auto"`,
        { file, tensor: bf16.checkpoint },
      );
    }
    const injection = o.injection === 'auto' ? (bf16 === undefined ? 'inputs' : 'rewrite') : o.injection;
    // The stored weights are never used again (candidates replace them): drop them rather than hold a second copy.
    graph.initializer = (graph.initializer ?? []).filter((t) => !slotNames.has(t.name ?? ''));
    // Sessions are created from bytes, so ONNX Runtime cannot find external files itself.
    await inlineExternalData(model, file, slotNames);

    const tokenizer = o.tokenizerPath === undefined ? undefined : await loadTokenizer(o.tokenizerPath);
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      executionProviders: [o.provider],
      graphOptimizationLevel: 'all',
      // Warnings (such as unused initializers) would go to stderr on every session; errors still throw.
      logSeverityLevel: 3,
      ...(o.intraOpThreads === undefined ? {} : { intraOpNumThreads: o.intraOpThreads }),
    };
    let session: ort.InferenceSession | undefined;
    if (injection === 'inputs') {
      session = await openSession(encodeWithWeightInputs(model, slots, file), sessionOptions, o.provider, file);
      const missing = slots.find((s) => !session!.inputNames.includes(s.graphName));
      if (missing !== undefined) {
        await session.release();
        throw new OnnxModelError(
          `ONNX Runtime does not list "${missing.graphName}" as an input after conversion; use injection "rewrite"`,
          { file, tensor: missing.checkpoint },
        );
      }
    } else {
      // Open (and drop) one session now so that a model ONNX Runtime rejects, or a missing provider, fails here rather than on the first candidate.
      const zeros = slots.map((s) => new Float32Array(s.size));
      const probe = await openSession(encodeWithWeightValues(model, slots, zeros), sessionOptions, o.provider, file);
      await probe.release();
    }
    return new OnnxEvaluator({
      o,
      model,
      slots,
      unmatched,
      extras,
      int32Ids: idType === DataType.INT32,
      vocabSize,
      injection,
      tokenizer,
      sessionOptions,
      session,
    });
  }

  /**
   * Reads and tokenizes task files with this evaluator's tokenizer, and checks
   * that every example fits the model (token ids, length); pass the result to
   * {@link evaluate} to avoid reading them for every candidate.
   * @throws TaskDataError naming file and line.
   */
  async loadTasks(tasks: readonly TaskSpec[]): Promise<LoadedTask[]> {
    const loaded = await loadTasks(tasks, this.tokenizer);
    for (const t of loaded) checkTask(t, this.#vocabSize, this.#o.maxSequence);
    return loaded;
  }

  /**
   * Scores one candidate on every task.
   * @param weights The candidate's value of each checkpoint tensor in {@link weightNames}.
   * @param tasks Task files, or tasks loaded with {@link loadTasks}.
   * @param metric `exact_match` (greedy decoding reproduces the answer) or `log_likelihood` (mean answer-token log-probability).
   * @param signal Aborts between forward passes.
   * @returns Score per task name.
   * @throws OnnxModelError if a weight has the wrong size or ONNX Runtime fails.
   * @throws TaskDataError for a bad task line.
   */
  evaluate(
    weights: WeightSource,
    tasks: readonly (TaskSpec | LoadedTask)[],
    metric: Metric,
    signal?: AbortSignal,
  ): Promise<Record<string, number>> {
    return this.#serial(async () => {
      if (!METRICS.includes(metric))
        throw new RangeError(`metric: expected ${METRICS.join(' or ')}, got ${String(metric)}`);
      const specs = tasks.filter((t) => !isLoaded(t));
      const loaded = specs.length === 0 ? [] : await this.loadTasks(specs);
      const all = tasks.map((t) => (isLoaded(t) ? t : loaded.shift()!));
      const names = new Set<string>();
      for (const t of all) {
        if (names.has(t.name)) throw new RangeError(`tasks: the name ${JSON.stringify(t.name)} is used twice`);
        names.add(t.name);
      }
      return this.#withCandidate(weights, signal, async (forward) => {
        const scores: Record<string, number> = {};
        for (const t of all) {
          scores[t.name] = await scoreTask(t, metric, forward, {
            batchSize: this.#o.batchSize,
            maxSequence: this.#o.maxSequence,
            vocabSize: this.#vocabSize,
            maxLogitsBytes: this.#o.maxLogitsBytes,
            signal,
          });
        }
        return scores;
      });
    });
  }

  /**
   * Runs one forward pass of a candidate on token sequences of equal length;
   * for checks and debugging.
   * @throws RangeError if the sequences are empty or of different lengths.
   */
  logits(
    weights: WeightSource,
    sequences: readonly (readonly number[])[],
    signal?: AbortSignal,
  ): Promise<LogitsResult> {
    return this.#serial(async () => {
      const seq = sequences[0]?.length ?? 0;
      if (seq === 0 || sequences.some((s) => s.length !== seq))
        throw new RangeError('sequences: must be non-empty and all of one length');
      const ids = BigInt64Array.from(sequences.flat(), (t) => BigInt(t));
      return this.#withCandidate(weights, signal, async (forward) => {
        const out = await forward(ids, sequences.length, seq);
        return { data: out.data, dims: [sequences.length, seq, out.vocab] };
      });
    });
  }

  /** Releases the ONNX Runtime session once running evaluations have finished. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#tail;
    await this.#session?.release();
    this.#session = undefined;
  }

  /** Runs calls one after another: one candidate's weights in memory at a time. */
  #serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new OnnxEvaluatorError('the evaluator is closed'));
    const run = this.#tail.then(fn);
    this.#tail = run.catch(() => undefined);
    return run;
  }

  /** Fetches a candidate's weights and gives `fn` a forward pass that uses them. */
  async #withCandidate<T>(
    weights: WeightSource,
    signal: AbortSignal | undefined,
    fn: (forward: ForwardFn) => Promise<T>,
  ): Promise<T> {
    const file = this.#o.modelPath;
    const values: Float32Array[] = [];
    for (const s of this.#slots) {
      signal?.throwIfAborted();
      const v = await weights(s.checkpoint);
      if (!(v instanceof Float32Array) || v.length !== s.size) {
        const got = v instanceof Float32Array ? `${v.length} values` : 'not a Float32Array';
        throw new OnnxModelError(
          `checkpoint tensor "${s.checkpoint}": got ${got}, but ${s.holder} "${s.graphName}" has shape [${s.shape.join(', ')}] (${s.size} values)`,
          { file, tensor: s.checkpoint },
        );
      }
      values.push(v);
    }
    signal?.throwIfAborted();
    if (this.injection === 'inputs') {
      const feeds: Record<string, ort.Tensor> = {};
      this.#slots.forEach((s, i) => {
        const v = values[i]!;
        feeds[s.graphName] =
          s.dtype === 'float16'
            ? new ort.Tensor('float16', f32ToF16(v), s.shape)
            : new ort.Tensor('float32', v, s.shape);
      });
      return fn(this.#forward(this.#session!, feeds));
    }
    const bytes = encodeWithWeightValues(this.#model, this.#slots, values);
    values.length = 0;
    const session = await openSession(bytes, this.#sessionOptions, this.#o.provider, file);
    try {
      return await fn(this.#forward(session, {}));
    } finally {
      await session.release();
    }
  }

  #forward(session: ort.InferenceSession, weightFeeds: Readonly<Record<string, ort.Tensor>>): ForwardFn {
    const { inputName, outputName, modelPath: file } = this.#o;
    return async (ids, batch, seq) => {
      const feeds: Record<string, ort.Tensor> = { ...weightFeeds };
      feeds[inputName] = this.#int32Ids
        ? new ort.Tensor('int32', Int32Array.from(ids, Number), [batch, seq])
        : new ort.Tensor('int64', ids, [batch, seq]);
      for (const x of this.#extras) {
        // Batches are never padded: every position is attended, positions count from 0.
        const at = (i: number): number => (x.kind === 'attention_mask' ? 1 : i % seq);
        feeds[x.name] = x.int32
          ? new ort.Tensor(
              'int32',
              Int32Array.from({ length: batch * seq }, (_, i) => at(i)),
              [batch, seq],
            )
          : new ort.Tensor(
              'int64',
              BigInt64Array.from({ length: batch * seq }, (_, i) => BigInt(at(i))),
              [batch, seq],
            );
      }
      let out: ort.InferenceSession.OnnxValueMapType;
      try {
        out = await session.run(feeds, [outputName]);
      } catch (cause) {
        throw new OnnxModelError(
          `ONNX Runtime failed on a batch of ${batch}×${seq} tokens: ${(cause as Error).message}`,
          { file, cause },
        );
      }
      const t = out[outputName];
      const dims = t?.dims ?? [];
      if (t === undefined || dims.length !== 3 || dims[0] !== batch || dims[1] !== seq || !(dims[2]! > 0)) {
        throw new OnnxModelError(
          `output "${outputName}" has shape [${dims.join(', ')}]; expected [${batch}, ${seq}, vocab]`,
          { file },
        );
      }
      let data: Float32Array;
      if (t.type === 'float32') data = t.data as Float32Array;
      else if (t.type === 'float16') data = f16ToF32(t.data as Uint16Array);
      else
        throw new OnnxModelError(`output "${outputName}" has type ${t.type}; expected float32 or float16 logits`, {
          file,
        });
      return { data, vocab: dims[2]! };
    };
  }
}

/** Token ids of any length in any number are fed, so both axes must be dynamic. */
function checkDynamic(v: IValueInfoProto, name: string, file: string): void {
  const dims = v.type?.tensorType?.shape?.dim;
  if (dims == null) return;
  if (dims.length !== 2)
    throw new OnnxModelError(`input "${name}" must have two axes [batch, seq], has ${dims.length}`, { file });
  const fixed = dims
    .map((d, i) =>
      d.dimValue != null && d.dimParam == null ? `${i === 0 ? 'batch' : 'seq'} = ${int64(d.dimValue)}` : '',
    )
    .filter((s) => s !== '');
  if (fixed.length > 0) {
    throw new OnnxModelError(
      `input "${name}" has a fixed ${fixed.join(' and ')}; export it with dynamic axes (torch.onnx.export(..., dynamic_axes={"${name}": {0: "batch", 1: "seq"}}))`,
      { file },
    );
  }
}

/**
 * Creates a session, telling a missing CUDA provider apart from a model error.
 * @throws ProviderUnavailableError or OnnxModelError.
 */
async function openSession(
  bytes: Uint8Array,
  options: ort.InferenceSession.SessionOptions,
  provider: OrtProvider,
  file: string,
): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(bytes, options);
  } catch (cause) {
    const msg = (cause as Error).message ?? String(cause);
    if (provider === 'cuda' && /cuda|providers_shared|execution provider/i.test(msg)) {
      throw new ProviderUnavailableError(
        'cuda',
        "ONNX Runtime's CUDA execution provider is not installed (onnxruntime-node bundles the CPU provider only). " +
          'Install its CUDA 12 binaries with `ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install`, or use provider cpu. ' +
          `ONNX Runtime said: ${msg}`,
        { file, cause },
      );
    }
    throw new OnnxModelError(`ONNX Runtime cannot load the model: ${msg}`, { file, cause });
  }
}
