/**
 * Which tensors of an ONNX model are checkpoint weights, and how candidate values get into the model in memory
 * (as graph inputs, or by rewriting initializers). See docs/design/onnx-evaluator.md.
 */
import { open, readFile } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve } from 'node:path';
import { encodeFromF32 } from '../../../proto/safetensors/dtype.js';
import { OnnxModelError } from './errors.js';
import {
  DataType,
  dataTypeName,
  int64,
  onnx,
  type IGraphProto,
  type IModelProto,
  type ITensorProto,
  type IValueInfoProto,
  type ModelProto,
} from './onnx-schema.js';

/** Element type of an injectable weight. */
export type WeightDtype = 'float32' | 'float16' | 'bfloat16';

/** A checkpoint tensor mapped to a tensor of the graph. */
export interface WeightSlot {
  /** Name in the checkpoint (what `weights(name)` is asked for). */
  checkpoint: string;
  /** Name in the ONNX graph (initializer or graph input). */
  graphName: string;
  shape: readonly number[];
  /** Number of elements. */
  size: number;
  dtype: WeightDtype;
  /** The model holds it as an initializer (possibly also listed as a graph input), or only as a graph input. */
  holder: 'initializer' | 'input';
}

/** `{ "checkpoint name": "graph name" }`. */
export type NameMap = Readonly<Record<string, string>>;

/** Checkpoint tensor shapes, by checkpoint name (for instance from the base's safetensors header). */
export type CheckpointShapes = Readonly<Record<string, readonly number[]>>;

const DTYPES = new Map<number, WeightDtype>([
  [DataType.FLOAT, 'float32'],
  [DataType.FLOAT16, 'float16'],
  [DataType.BFLOAT16, 'bfloat16'],
]);
const DTYPE_CODES: Record<WeightDtype, number> = {
  float32: DataType.FLOAT,
  float16: DataType.FLOAT16,
  bfloat16: DataType.BFLOAT16,
};
const SAFETENSORS_DTYPE = { float32: 'F32', float16: 'F16', bfloat16: 'BF16' } as const;

/** Bytes per element of fixed-size ONNX data types, to size external data without a `length` entry. */
const ELEMENT_BYTES = new Map<number, number>([
  [DataType.FLOAT, 4],
  [DataType.UINT8, 1],
  [DataType.INT8, 1],
  [DataType.UINT16, 2],
  [DataType.INT16, 2],
  [DataType.INT32, 4],
  [DataType.INT64, 8],
  [DataType.BOOL, 1],
  [DataType.FLOAT16, 2],
  [DataType.DOUBLE, 8],
  [DataType.UINT32, 4],
  [DataType.UINT64, 8],
  [DataType.COMPLEX64, 8],
  [DataType.COMPLEX128, 16],
  [DataType.BFLOAT16, 2],
]);

const fmt = (shape: readonly number[]): string => `[${shape.map((d) => (d < 0 ? '?' : String(d))).join(', ')}]`;
const product = (shape: readonly number[]): number => shape.reduce((a, d) => a * d, 1);

/**
 * Reads and decodes an ONNX model file.
 * @throws OnnxModelError if it is not a model with a graph.
 */
export async function readModel(file: string): Promise<ModelProto> {
  const bytes = await readFile(file);
  let model: ModelProto;
  try {
    model = onnx.ModelProto.decode(bytes);
  } catch (cause) {
    throw new OnnxModelError(`not an ONNX model: ${(cause as Error).message}`, { file, cause });
  }
  if (model.graph == null) throw new OnnxModelError('the model has no graph', { file });
  return model;
}

/**
 * Reads a JSON name map `{ "checkpoint name": "graph name" }`.
 * @throws OnnxModelError if it is not an object of strings.
 */
export async function loadNameMap(file: string): Promise<NameMap> {
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file, 'utf8'));
  } catch (cause) {
    throw new OnnxModelError(`name map is not valid JSON: ${(cause as Error).message}`, { file, cause });
  }
  checkNameMap(json, file);
  return json;
}

/**
 * Checks that a value is a name map.
 * @throws OnnxModelError naming the first bad entry.
 */
export function checkNameMap(json: unknown, file?: string): asserts json is NameMap {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new OnnxModelError('a name map must be a JSON object { "checkpoint name": "initializer name" }', { file });
  }
  for (const [k, v] of Object.entries(json)) {
    if (typeof v !== 'string')
      throw new OnnxModelError(`name map entry ${JSON.stringify(k)} must map to a string, got ${JSON.stringify(v)}`, {
        file,
        tensor: k,
      });
  }
}

/** The declared shape of a value, with -1 for symbolic or missing dims; undefined if none is declared. */
function valueShape(v: IValueInfoProto): number[] | undefined {
  const dims = v.type?.tensorType?.shape?.dim;
  if (dims == null) return undefined;
  return dims.map((d) => (d.dimValue != null && d.dimParam == null ? int64(d.dimValue) : -1));
}

interface GraphTensor {
  name: string;
  dataType: number;
  shape: number[] | undefined;
  holder: 'initializer' | 'input';
}

/** Initializers, and graph inputs that have no initializer (minus `reserved` inputs such as `input_ids`). */
function graphTensors(graph: IGraphProto, reserved: ReadonlySet<string>): Map<string, GraphTensor> {
  const out = new Map<string, GraphTensor>();
  for (const t of graph.initializer ?? []) {
    const name = t.name ?? '';
    out.set(name, { name, dataType: t.dataType ?? 0, shape: (t.dims ?? []).map(int64), holder: 'initializer' });
  }
  for (const v of graph.input ?? []) {
    const name = v.name ?? '';
    if (out.has(name) || reserved.has(name)) continue;
    out.set(name, { name, dataType: v.type?.tensorType?.elemType ?? 0, shape: valueShape(v), holder: 'input' });
  }
  return out;
}

/** Options of {@link planWeights}. */
export interface PlanOptions {
  /** The model file, for messages. */
  file: string;
  nameMap?: NameMap | undefined;
  checkpointShapes?: CheckpointShapes | undefined;
  /** Graph inputs that are not weights (`input_ids`, `attention_mask`, `position_ids`). */
  reserved: ReadonlySet<string>;
}

/** The weights to inject, and the checkpoint tensors that have no counterpart in the graph. */
export interface WeightPlan {
  slots: WeightSlot[];
  /** Checkpoint tensors (from `checkpointShapes`) that no graph tensor takes, such as a tied `lm_head.weight`. */
  unmatched: string[];
}

/**
 * Maps checkpoint tensors to graph tensors.
 *
 * The injected tensors are: every name-map entry; and every floating-point
 * initializer or graph input not taken by the map whose name is a checkpoint
 * tensor. Without `checkpointShapes` a constant cannot be told from a weight,
 * so then: with no name map every floating-point tensor counts as a weight;
 * with a name map exactly its entries do.
 * @throws OnnxModelError for an unknown graph name, a non-float tensor, a shape mismatch, or a map target used twice.
 */
export function planWeights(model: IModelProto, o: PlanOptions): WeightPlan {
  const tensors = graphTensors(model.graph ?? {}, o.reserved);
  const shapes = o.checkpointShapes;
  const pairs: [checkpoint: string, graphName: string][] = [];
  const taken = new Map<string, string>();
  for (const [ckpt, g] of Object.entries(o.nameMap ?? {})) {
    if (!tensors.has(g)) {
      throw new OnnxModelError(
        `name map: checkpoint tensor "${ckpt}" maps to "${g}", which is neither an initializer nor a graph input of the model`,
        { file: o.file, tensor: ckpt },
      );
    }
    if (shapes !== undefined && !Object.hasOwn(shapes, ckpt)) {
      throw new OnnxModelError(`name map: "${ckpt}" is not a tensor of the checkpoint`, { file: o.file, tensor: ckpt });
    }
    const prior = taken.get(g);
    if (prior !== undefined)
      throw new OnnxModelError(`name map: "${prior}" and "${ckpt}" both map to "${g}"`, { file: o.file, tensor: ckpt });
    taken.set(g, ckpt);
    pairs.push([ckpt, g]);
  }
  const identity = shapes !== undefined || o.nameMap === undefined;
  if (identity) {
    for (const t of tensors.values()) {
      if (taken.has(t.name) || !DTYPES.has(t.dataType)) continue;
      if (shapes !== undefined ? Object.hasOwn(shapes, t.name) : true) pairs.push([t.name, t.name]);
    }
  }
  const slots = pairs.map(([checkpoint, graphName]): WeightSlot => {
    const t = tensors.get(graphName)!;
    const kind = t.holder === 'initializer' ? 'initializer' : 'graph input';
    const dtype = DTYPES.get(t.dataType);
    if (dtype === undefined) {
      throw new OnnxModelError(
        `${kind} "${graphName}" (checkpoint tensor "${checkpoint}") has dtype ${dataTypeName(t.dataType)}; only FLOAT, FLOAT16 and BFLOAT16 weights can be injected`,
        { file: o.file, tensor: checkpoint },
      );
    }
    const want = shapes?.[checkpoint];
    let shape = t.shape;
    if (want !== undefined) {
      // An input without a declared shape takes the checkpoint's; declared dims must agree (symbolic ones take any size).
      const fits =
        shape === undefined || (shape.length === want.length && shape.every((d, i) => d < 0 || d === want[i]));
      if (!fits) {
        throw new OnnxModelError(
          `checkpoint tensor "${checkpoint}" has shape ${fmt(want)} but ${kind} "${graphName}" has shape ${shape === undefined ? 'undeclared' : fmt(shape)}`,
          { file: o.file, tensor: checkpoint },
        );
      }
      shape = [...want];
    }
    if (shape === undefined || shape.some((d) => d < 0)) {
      throw new OnnxModelError(
        `${kind} "${graphName}" has no fixed shape; give the checkpoint shapes (checkpointShapes) so that "${checkpoint}" can be fed`,
        { file: o.file, tensor: checkpoint },
      );
    }
    return { checkpoint, graphName, shape, size: product(shape), dtype, holder: t.holder };
  });
  const used = new Set(slots.map((s) => s.checkpoint));
  const unmatched = shapes === undefined ? [] : Object.keys(shapes).filter((n) => !used.has(n));
  return { slots, unmatched };
}

/**
 * Loads the external data of initializers into the in-memory model, so that a
 * session can be created from bytes (ONNX Runtime then has no directory to
 * resolve external files against). Initializers in `skip` (the weights, whose
 * values come from the candidate) are not read.
 * @throws OnnxModelError for an external file outside the model's folder or too short.
 */
export async function inlineExternalData(
  model: ModelProto,
  modelFile: string,
  skip: ReadonlySet<string>,
): Promise<void> {
  const dir = dirname(resolve(modelFile));
  for (const t of model.graph?.initializer ?? []) {
    if (t.dataLocation !== onnx.TensorProto.DataLocation.EXTERNAL || skip.has(t.name ?? '')) continue;
    const kv = new Map((t.externalData ?? []).map((e) => [e.key ?? '', e.value ?? '']));
    const location = kv.get('location');
    const fail = (m: string, cause?: unknown): never => {
      throw new OnnxModelError(`initializer "${t.name}": ${m}`, {
        file: modelFile,
        tensor: t.name ?? undefined,
        cause,
      });
    };
    if (location === undefined) fail('external data without a "location"');
    const path = resolve(dir, location!);
    const rel = relative(dir, path);
    if (rel.startsWith('..') || isAbsolute(rel))
      fail(`external data location ${JSON.stringify(location)} is outside the model's folder`);
    const offset = Number(kv.get('offset') ?? '0');
    const elementBytes = ELEMENT_BYTES.get(t.dataType ?? 0);
    const length = kv.has('length')
      ? Number(kv.get('length'))
      : elementBytes === undefined
        ? NaN
        : elementBytes * product((t.dims ?? []).map(int64));
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0)
      fail('external data with an invalid offset or length');
    const bytes = new Uint8Array(length);
    try {
      const fh = await open(path, 'r');
      try {
        const { bytesRead } = await fh.read(bytes, 0, length, offset);
        if (bytesRead !== length) fail(`external file ${location} ends before ${length} bytes at offset ${offset}`);
      } finally {
        await fh.close();
      }
    } catch (e) {
      if (e instanceof OnnxModelError) throw e;
      fail(`cannot read external data ${location}: ${(e as Error).message}`, e);
    }
    t.rawData = bytes;
    t.externalData = [];
    t.dataLocation = onnx.TensorProto.DataLocation.DEFAULT;
  }
}

function weightValueInfo(s: WeightSlot): IValueInfoProto {
  return {
    name: s.graphName,
    type: { tensorType: { elemType: DTYPE_CODES[s.dtype], shape: { dim: s.shape.map((d) => ({ dimValue: d })) } } },
  };
}

/**
 * Encodes a copy of `model` in which every slot is a plain graph input with a
 * fixed shape and no initializer (the original model is not changed).
 * @throws OnnxModelError for a bfloat16 slot, which cannot be fed from JavaScript.
 */
export function encodeWithWeightInputs(model: IModelProto, slots: readonly WeightSlot[], file?: string): Uint8Array {
  const bf16 = slots.find((s) => s.dtype === 'bfloat16');
  if (bf16 !== undefined) {
    throw new OnnxModelError(
      `"${bf16.graphName}" is BFLOAT16, which ONNX Runtime's JavaScript API cannot feed; use injection "rewrite"`,
      { file, tensor: bf16.checkpoint },
    );
  }
  const g = model.graph ?? {};
  const byName = new Map(slots.map((s) => [s.graphName, s]));
  const initializer = (g.initializer ?? []).filter((t) => !byName.has(t.name ?? ''));
  const input = (g.input ?? []).filter((v) => !byName.has(v.name ?? ''));
  for (const s of slots) input.push(weightValueInfo(s));
  const graph: IGraphProto = { ...g, initializer, input };
  return onnx.ModelProto.encode({ ...model, graph }).finish();
}

/**
 * Encodes a copy of `model` whose slots are initializers holding `values`
 * (float32, converted to each slot's dtype with round-to-nearest-even).
 */
export function encodeWithWeightValues(
  model: IModelProto,
  slots: readonly WeightSlot[],
  values: readonly Float32Array[],
): Uint8Array {
  const g = model.graph ?? {};
  const byName = new Map(slots.map((s) => [s.graphName, s]));
  const initializer: ITensorProto[] = (g.initializer ?? []).filter((t) => !byName.has(t.name ?? ''));
  slots.forEach((s, i) => {
    initializer.push({
      name: s.graphName,
      dataType: DTYPE_CODES[s.dtype],
      dims: [...s.shape],
      rawData: encodeFromF32(values[i]!, SAFETENSORS_DTYPE[s.dtype]),
    });
  });
  // From IR 4 on an initializer need not be a graph input; leaving it out keeps the value fixed in the session.
  const keepInputs = (model.irVersion == null ? 0 : int64(model.irVersion)) < 4;
  const input = keepInputs ? (g.input ?? []) : (g.input ?? []).filter((v) => !byName.has(v.name ?? ''));
  const graph: IGraphProto = { ...g, initializer, input };
  return onnx.ModelProto.encode({ ...model, graph }).finish();
}

/**
 * Converts a model so that its weights are plain graph inputs without stored
 * values: the form the evaluator feeds candidates into. The evaluator does this
 * in memory by itself; writing the result to a file gives a model file without
 * a second copy of the weights (the checkpoint supplies them).
 * @param modelBytes An ONNX model (external data stays referenced for the tensors kept).
 * @param names Initializers to convert. @default every FLOAT and FLOAT16 initializer
 * @returns The converted model's bytes.
 * @throws OnnxModelError for an unknown name or a tensor that is not FLOAT/FLOAT16.
 */
export function weightsAsGraphInputs(modelBytes: Uint8Array, names?: readonly string[]): Uint8Array {
  const model = onnx.ModelProto.decode(modelBytes);
  const inits = new Map((model.graph?.initializer ?? []).map((t) => [t.name ?? '', t]));
  const chosen =
    names ??
    [...inits.values()]
      .filter((t) => t.dataType === DataType.FLOAT || t.dataType === DataType.FLOAT16)
      .map((t) => t.name ?? '');
  const slots = chosen.map((name): WeightSlot => {
    const t = inits.get(name);
    if (t === undefined) throw new OnnxModelError(`the model has no initializer "${name}"`, { tensor: name });
    const dtype = DTYPES.get(t.dataType ?? 0);
    if (dtype === undefined || dtype === 'bfloat16')
      throw new OnnxModelError(
        `initializer "${name}" has dtype ${dataTypeName(t.dataType)}; only FLOAT and FLOAT16 can be fed`,
        { tensor: name },
      );
    const shape = (t.dims ?? []).map(int64);
    return { checkpoint: name, graphName: name, shape, size: product(shape), dtype, holder: 'initializer' };
  });
  return encodeWithWeightInputs(model, slots);
}
