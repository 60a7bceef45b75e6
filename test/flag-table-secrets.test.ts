/**
 * A command-line error never repeats what may be a secret: the value of an
 * unknown `--flag=value`, or a long stray argument.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseCommand, text, UsageError } from '../proto/cli/flag-table.js';

const CMD = { name: 'demo', usage: '[options]', description: 'a demo command' };
const flags = { token: text('TOKEN', 'a token') };
const SECRET = 'a8f3c2d9e1b7a8f3c2d9e1b7';

function usageMessage(argv: string[]): string {
  try {
    parseCommand(CMD, flags, argv);
  } catch (err) {
    assert.ok(err instanceof UsageError, String(err));
    return err.message;
  }
  return assert.fail('the command line was accepted');
}

describe('command-line errors', () => {
  it('name an unknown --flag=value without its value, still suggesting the flag meant', () => {
    const m = usageMessage([`--tokn=${SECRET}`]);
    assert.ok(!m.includes(SECRET), m);
    assert.match(m, /Unknown option '--tokn=…' \(did you mean --token\?\)/);
  });

  it('show a short stray argument as typed and a long one only by its length', () => {
    const m = usageMessage(['extra', SECRET]);
    assert.ok(!m.includes(SECRET), m);
    assert.match(m, new RegExp(`unexpected arguments "extra" \\(${SECRET.length} characters\\)`));
  });
});
