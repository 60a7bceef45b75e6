#!/usr/bin/env node
// The `dppa` command. `serve` belongs to the server; every other command to the client.
// Runs the compiled code in dist/ (built by `npm ci` through the `prepare` script).
import { existsSync } from 'node:fs';

const dist = new URL('../dist/', import.meta.url);
if (!existsSync(dist)) {
  process.stderr.write('dppa: dist/ is missing; run `npm ci` (or `npm run build`) first\n');
  process.exit(1);
}
const entry = process.argv[2] === 'serve' ? '../dist/server/cli.js' : '../dist/client/cli/main.js';
const { main } = await import(entry);
process.exitCode = await main(process.argv.slice(2));
