/**
 * The HTTP/2 receive window of the server's connections.
 *
 * Node's HTTP/2 opens every connection and every stream with the protocol's
 * default window of 64 KiB: a client may have 64 KiB in flight before it waits
 * for a WINDOW_UPDATE. On an upload of hundreds of megabytes that ping-pong,
 * not the network, sets the pace (measured here: a grpc-js client-streaming
 * call reached about twice the throughput with a 4 MiB window). Both windows
 * must grow: the connection's (`setLocalWindowSize`) and each stream's
 * (SETTINGS_INITIAL_WINDOW_SIZE); either alone changes nothing.
 *
 * grpc-js 1.14 has no server option for it: its client honours
 * `grpc-node.flow_control_window`, its server does not yet (grpc/grpc-node
 * pull request 3058 would add it). Until then this reaches the HTTP/2 servers
 * grpc-js keeps in its private `http2Servers` map. If a grpc-js upgrade
 * removes that map the server still works, with the 64 KiB window, and says
 * so in its log; test/server-receive-window.test.ts fails on such an upgrade.
 */
import type { Http2Server, ServerHttp2Session } from 'node:http2';
import type { Server } from '@grpc/grpc-js';
import type { Logger } from '../log.js';

/** The smallest window HTTP/2 allows to advertise, and Node's default. */
export const DEFAULT_HTTP2_WINDOW = 65_535;
/** The largest window HTTP/2 allows (2^31 − 1). */
export const MAX_HTTP2_WINDOW = 2 ** 31 - 1;

/**
 * Gives every connection the server accepts from now on a receive window of
 * `bytes`, for the connection and for each of its streams. Call it after the
 * server is bound. If grpc-js internals changed, it logs a warning and
 * leaves the default window.
 */
export function widenReceiveWindow(server: Server, bytes: number, log: Logger): void {
  if (bytes <= DEFAULT_HTTP2_WINDOW) return;
  const servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(servers instanceof Map) || servers.size === 0) {
    log.warn('cannot set the HTTP/2 receive window (grpc-js internals changed): uploads keep the 64 KiB window', { bytes });
    return;
  }
  const widen = (session: ServerHttp2Session): void => {
    try {
      session.settings({ initialWindowSize: bytes });
      session.setLocalWindowSize(bytes);
    } catch (err) {
      // A session closing as it opens: nothing to widen.
      log.debug('HTTP/2 receive window not set on a closing session', { error: String(err) });
    }
  };
  for (const http2Server of servers.keys() as IterableIterator<Http2Server>) http2Server.on('session', widen);
}
