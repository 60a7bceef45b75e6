import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { hashToken, newPartyToken, randomId } from '../server/tokens.js';

void describe('party tokens and job ids', () => {
  void it('never start with "-", which the CLI would take for an option', () => {
    // Without the redraw one id in 64 starts with "-": 3000 draws miss that with probability below 1e-20.
    for (let i = 0; i < 3000; i++) {
      assert.doesNotMatch(randomId(9), /^-/);
      assert.doesNotMatch(newPartyToken().token, /^-/);
    }
  });

  void it('are base64url of the requested size, tokens stored as their SHA-256', () => {
    assert.match(randomId(9), /^[A-Za-z0-9_-]{12}$/);
    const { token, sha256 } = newPartyToken();
    assert.match(token, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(sha256, hashToken(token));
    assert.match(sha256, /^[0-9a-f]{64}$/);
  });
});
