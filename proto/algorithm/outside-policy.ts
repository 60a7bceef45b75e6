/**
 * What a party does with the tensors outside the linear layers (partition 0),
 * defined once for both sides: the words of the SDK and CLI, their schema enum
 * `dppa.v1.OutsidePolicy`, and the check of untyped input.
 */
import { OutsidePolicy as W } from '../gen/dppa/v1/algorithm.js';
import { wordEnum } from './word-enum.js';

/** Sent whole, matrices pruned by magnitude, or not sent. */
export const OUTSIDE_POLICIES = ['dense', 'magnitude', 'skip'] as const;
/** What happens to tensors outside the linear layers. */
export type OutsidePolicy = (typeof OUTSIDE_POLICIES)[number];
/** The policy of a prune that names none. */
export const DEFAULT_OUTSIDE_POLICY: OutsidePolicy = 'dense';

const POLICY = wordEnum<OutsidePolicy, W>({
  words: OUTSIDE_POLICIES,
  wire: { dense: W.OUTSIDE_POLICY_DENSE, magnitude: W.OUTSIDE_POLICY_MAGNITUDE, skip: W.OUTSIDE_POLICY_SKIP },
  names: W,
  fields: ['outside', 'options.outside'],
});

/**
 * `parseOutsidePolicy(value, field)`: a policy given as text (an option or a flag), or UnknownValueError
 * naming `field`. `outsidePolicyToWire`: its schema enum value. `outsidePolicyFromWire(wire, legacy,
 * prefix)`: the policy a DeltaHeader carries, `outside` else an older client's `options["outside"]`
 * (UnknownValueError naming the field for an unknown one, RangeError when the two disagree).
 */
export const { parse: parseOutsidePolicy, toWire: outsidePolicyToWire, fromWire: outsidePolicyFromWire } = POLICY;
