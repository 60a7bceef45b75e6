/** The package's version, for `dppa --version`: from package.json, found from the sources (client/cli/) and from the build (dist/client/cli/). */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** `0.1.0`; `unknown` when package.json says none. @throws Error if no package.json is found. */
export function packageVersion(): string {
  for (const rel of ['../../package.json', '../../../package.json']) {
    const file = fileURLToPath(new URL(rel, import.meta.url));
    if (!existsSync(file)) continue;
    const v = (JSON.parse(readFileSync(file, 'utf8')) as { version?: unknown }).version;
    return typeof v === 'string' && v !== '' ? v : 'unknown';
  }
  throw new Error(`cannot find package.json near ${fileURLToPath(import.meta.url)}`);
}
