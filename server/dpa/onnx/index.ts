/**
 * The ONNX evaluator: per-task scores of one candidate set of weights, computed
 * on the server with ONNX Runtime. Contract and usage: docs/onnx-evaluator.md.
 * @packageDocumentation
 */
export { OnnxEvaluator, evaluatorDefaults } from './onnx-evaluator.js';
export type { OnnxEvaluatorOptions, OrtProvider, Injection, WeightSource, LogitsResult } from './onnx-evaluator.js';
export { METRICS, scoreTask, scoreExamples } from './causal-lm-scorer.js';
export type { Metric, ForwardFn, BatchLogits, ScoreOptions } from './causal-lm-scorer.js';
export { loadTask, loadTasks } from './tasks.js';
export type { TaskSpec, TaskExample, LoadedTask } from './tasks.js';
export { CharTokenizer, loadTokenizer, parseTokenizer } from './tokenizer.js';
export type { Tokenizer, CharTokenizerDescription } from './tokenizer.js';
export { weightsAsGraphInputs } from './model-weights.js';
export type { NameMap, CheckpointShapes, WeightDtype } from './model-weights.js';
export {
  OnnxEvaluatorError,
  OnnxModelError,
  TokenizerError,
  TaskDataError,
  ProviderUnavailableError,
} from './errors.js';
export type { OnnxEvaluatorErrorOptions } from './errors.js';
