/**
 * What a server opened, closed in reverse order: each resource is pushed once
 * it is open, so a start that fails midway closes exactly what it opened.
 */

/** How the server stops. */
export interface CloseContext {
  /** In-flight work may finish (up to the grace period) rather than being cut off. */
  graceful: boolean;
}

type Close = (ctx: CloseContext) => Promise<void> | void;

/** A stack of resources to close. */
export class Closers {
  private readonly stack: { name: string; close: Close }[] = [];

  /** Adds a resource opened just now; it closes before those pushed earlier. */
  push(name: string, close: Close): void {
    this.stack.push({ name, close });
  }

  /**
   * Closes every resource, the last pushed first; one that fails does not
   * keep the others open.
   * @throws AggregateError naming the resources that failed to close, after all were tried.
   */
  async close(ctx: CloseContext): Promise<void> {
    const failures: unknown[] = [];
    for (let r = this.stack.pop(); r !== undefined; r = this.stack.pop()) {
      try {
        await r.close(ctx);
      } catch (err) {
        failures.push(new Error(`closing ${r.name} failed`, { cause: err }));
      }
    }
    if (failures.length > 0) throw new AggregateError(failures, `closing ${failures.length} resource(s) failed`);
  }
}
