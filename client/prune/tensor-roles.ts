/**
 * Which tensors are linear layers of a model layer and which are outside
 * tensors (spec "Terms").
 */

/** Default model-layer pattern: LLaMA `layers.N.`, GPT-2 `h.N.`, `blocks.N.`. */
export const DEFAULT_LAYER_PATTERN = String.raw`(?:^|\.)(?:layers|h|blocks)\.(\d+)\.`;

/** Role of one tensor in pruning. */
export interface TensorRole {
  kind: 'linear' | 'outside';
  /** Model layer index, or -1 outside any layer. */
  layer: number;
}

/**
 * Compiles a layer pattern; its first capture group must be the layer number.
 * @throws RangeError when the pattern is not a valid regular expression with a group.
 */
export function compileLayerPattern(pattern: string): RegExp {
  let re: RegExp;
  try {
    re = new RegExp(pattern);
  } catch (err) {
    throw new RangeError(`layer pattern ${JSON.stringify(pattern)} is not a valid regular expression`, { cause: err });
  }
  if (new RegExp(`${pattern}|`).exec('')!.length < 2) {
    throw new RangeError(`layer pattern ${JSON.stringify(pattern)} needs a capture group for the layer number`);
  }
  return re;
}

/** A linear layer is a 2-D `*.weight` tensor inside a model layer; all else is outside. */
export function tensorRole(name: string, shape: readonly number[], layerPattern: RegExp): TensorRole {
  const m = layerPattern.exec(name);
  const layer = m?.[1] === undefined ? -1 : Number(m[1]);
  const linear = layer >= 0 && shape.length === 2 && name.endsWith('.weight');
  return { kind: linear ? 'linear' : 'outside', layer };
}
