import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { FUZZ_CASES } from './fixtures/upload-fuzz-cases.js';
import { runUploadFuzz } from './fixtures/upload-fuzz.js';

describe('upload fuzzing: malformed records of every kind through a real server', () => {
  it('answers each with its status and message, keeps none of it, and merges the valid deltas bit for bit', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'dppa-upload-fuzz-'));
    try {
      // Every case once, then as many again chosen by the seed.
      const report = await runUploadFuzz({ dir, seed: 14, count: 2 * FUZZ_CASES.length });
      assert.equal(report.requests, 2 * FUZZ_CASES.length);
      assert.deepEqual(Object.keys(report.cases).sort(), FUZZ_CASES.map((c) => c.name).sort(), 'every case was sent');
      for (const code of ['INVALID_ARGUMENT', 'DATA_LOSS', 'RESOURCE_EXHAUSTED'])
        assert.ok(report.codes[code]! > 0, code);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
