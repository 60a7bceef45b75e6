/**
 * The server's programmatic API (`dppa-federated/server`): run an aggregation
 * server inside your own process, as `dppa serve` does. Everything else under
 * server/ is internal.
 * @packageDocumentation
 */
export { DppaServer } from './server.js';
export type { StopOptions } from './server.js';
export type { ServerOptions, TlsOptions, NatsOptions } from './config.js';
export { ConfigError, NatsUnavailableError } from './errors.js';
export { createLogger } from './log.js';
export type { Logger, LoggerOptions, LogLevel, LogFields } from './log.js';
