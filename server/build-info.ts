/**
 * Which build of the server runs, for `dppa_build_info`: the version and the
 * source commit from the package's package.json (npm records the commit of a
 * published package as `gitHead`; the Dockerfile sets it from its COMMIT
 * argument). Found relative to this module in the sources (server/) and in
 * the build (dist/server/).
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The package's version and commit; `unknown` for what package.json does not say. */
export interface BuildInfo {
  version: string;
  commit: string;
}

/** @throws Error if neither location has a package.json. */
export function buildInfo(): BuildInfo {
  for (const rel of ['../package.json', '../../package.json']) {
    const file = fileURLToPath(new URL(rel, import.meta.url));
    if (!existsSync(file)) continue;
    const pkg = JSON.parse(readFileSync(file, 'utf8')) as { version?: unknown; gitHead?: unknown };
    const text = (v: unknown): string => (typeof v === 'string' && v !== '' ? v : 'unknown');
    return { version: text(pkg.version), commit: text(pkg.gitHead) };
  }
  throw new Error(`cannot find package.json near ${fileURLToPath(import.meta.url)}`);
}
