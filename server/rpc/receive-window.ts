/**
 * Grows the HTTP/2 receive window of the server's connections and streams beyond the default 64 KiB, which grpc-js
 * 1.14 offers no server option for. See docs/design/uploads.md.
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
    log.warn('cannot set the HTTP/2 receive window (grpc-js internals changed): uploads keep the 64 KiB window', {
      bytes,
    });
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
