/**
 * Secure aggregation (Bonawitz et al. 2017) of fixed-point vectors: the
 * protocol core that the party (client/) and the server both use. The server
 * learns the sum of the survivors' vectors on the union of their supports, not
 * any one party's values. See docs/privacy.md.
 */
export * from './aggregator.js';
export * from './errors.js';
export * from './fixed-point.js';
export * from './masks.js';
export * from './messages.js';
export * from './party.js';
export * from './prg.js';
export * from './shamir.js';
export * from './share-box.js';
export * from './support.js';
export * from './unmask.js';
export * from './x25519.js';
export { deriveKey, type KeyPurpose } from './derive.js';
