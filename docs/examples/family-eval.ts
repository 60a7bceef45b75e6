/**
 * A party's own evaluation for the embedded model family, as a `dppa push --eval-cmd`: scores a checkpoint folder on
 * ONE domain's validation split with the server's ONNX evaluator (exact match) and prints `{"task": score, ...}` as
 * the last line of stdout. `npm run demo -- --privacy secure` gives it to each party.
 *
 *   dppa push ... --eval-cmd 'npx tsx docs/examples/family-eval.ts math {model}'
 */
import { DOMAIN_NAMES, FamilyScorer, readWeights, type Domain } from './family-lab.js';

const [domain, modelDir, ...rest] = process.argv.slice(2);
if (modelDir === undefined || rest.length > 0 || !(DOMAIN_NAMES as string[]).includes(domain!)) {
  console.error(`usage: npx tsx docs/examples/family-eval.ts ${DOMAIN_NAMES.join('|')} MODEL_DIR`);
  process.exit(2);
}
const scorer = await FamilyScorer.open('validation', { domains: [domain as Domain] });
try {
  console.log(JSON.stringify(await scorer.score(await readWeights(modelDir), domain as Domain)));
} finally {
  await scorer.close();
}
