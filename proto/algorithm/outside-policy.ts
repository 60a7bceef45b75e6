/**
 * What a party does with the tensors outside the linear layers (partition 0),
 * defined once for both sides: the words of the SDK and CLI, their schema enum
 * `dppa.v1.OutsidePolicy`, and the check of untyped input.
 */
import { OutsidePolicy as WireOutsidePolicy } from '../gen/dppa/v1/algorithm.js';
import { oneOfWords } from './unknown-value.js';

/** Sent whole, matrices pruned by magnitude, or not sent. */
export const OUTSIDE_POLICIES = ['dense', 'magnitude', 'skip'] as const;
/** What happens to tensors outside the linear layers. */
export type OutsidePolicy = (typeof OUTSIDE_POLICIES)[number];
/** The policy of a prune that names none. */
export const DEFAULT_OUTSIDE_POLICY: OutsidePolicy = 'dense';

const TO_WIRE: Record<OutsidePolicy, WireOutsidePolicy> = {
  dense: WireOutsidePolicy.OUTSIDE_POLICY_DENSE,
  magnitude: WireOutsidePolicy.OUTSIDE_POLICY_MAGNITUDE,
  skip: WireOutsidePolicy.OUTSIDE_POLICY_SKIP,
};

/**
 * A policy given as text (an option or a flag).
 * @param field - Names the input in the error, e.g. `outside` or `--outside`.
 * @throws UnknownValueError unless `value` is one of {@link OUTSIDE_POLICIES}.
 */
export function parseOutsidePolicy(value: unknown, field: string): OutsidePolicy {
  return oneOfWords(value, field, OUTSIDE_POLICIES);
}

/** The schema's enum value of a policy. */
export function outsidePolicyToWire(policy: OutsidePolicy): WireOutsidePolicy {
  return TO_WIRE[policy];
}
