/**
 * An evaluation harness for the federated DPA search: scores a checkpoint folder with lm-evaluation-harness and
 * prints `{"task": score, ...}` as the last line of stdout. Settings (LM_EVAL_*): docs/design/examples.md.
 *
 *   LM_EVAL_TASKS=my_gsm8k_val dppa push ... --eval-cmd 'npx tsx docs/examples/eval-harness.ts {model}'
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const modelDir = process.argv[2];
const tasks = process.env.LM_EVAL_TASKS ?? '';
if (modelDir === undefined || tasks === '') {
  console.error('usage: LM_EVAL_TASKS=task1,task2 npx tsx docs/examples/eval-harness.ts MODEL_DIR');
  process.exit(2);
}

/** Runs lm_eval, its stdout and stderr both on our stderr. */
function lmEval(args: string[]): Promise<void> {
  const [command = 'lm_eval', ...leading] = (process.env.LM_EVAL_CMD ?? 'lm_eval').split(' ').filter((w) => w !== '');
  return new Promise((resolve, reject) => {
    const child = spawn(command, [...leading, ...args], { stdio: ['ignore', 2, 2] });
    child.on('error', (err) =>
      reject(
        new Error(`cannot run ${command}: ${err.message} (is lm-evaluation-harness installed? pip install lm-eval)`),
      ),
    );
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${command} exited with code ${code}`))));
  });
}

/** The newest `results*.json` under `dir` (lm_eval writes `<dir>/<model name>/results_<time>.json`). */
async function newestResults(dir: string): Promise<string> {
  let newest: { path: string; mtime: number } | undefined;
  for (const name of await readdir(dir, { recursive: true })) {
    if (!/(^|\/)results[^/]*\.json$/.test(name)) continue;
    const path = join(dir, name);
    const { mtimeMs } = await stat(path);
    if (newest === undefined || mtimeMs > newest.mtime) newest = { path, mtime: mtimeMs };
  }
  if (newest === undefined) throw new Error(`lm_eval wrote no results file under ${dir}`);
  return newest.path;
}

/** One score per requested task: LM_EVAL_METRIC, else "acc,none", else the first numeric metric that is not a stderr. */
function pickScores(results: Record<string, Record<string, unknown>>): Record<string, number> {
  const wanted = process.env.LM_EVAL_METRIC;
  const scores: Record<string, number> = {};
  for (const task of tasks.split(',').map((t) => t.trim())) {
    const metrics = results[task];
    if (metrics === undefined)
      throw new Error(`lm_eval reported no results for task ${task} (it has ${Object.keys(results).join(', ')})`);
    const key =
      wanted ??
      ('acc,none' in metrics
        ? 'acc,none'
        : Object.keys(metrics).find((k) => typeof metrics[k] === 'number' && !k.includes('stderr')));
    const value = key === undefined ? undefined : metrics[key];
    if (typeof value !== 'number')
      throw new Error(`task ${task} has no numeric metric ${JSON.stringify(key ?? '(any)')}`);
    scores[task] = value;
  }
  return scores;
}

const out = await mkdtemp(join(tmpdir(), 'eval-harness-'));
try {
  const modelArgs = [`pretrained=${modelDir}`, process.env.LM_EVAL_ARGS]
    .filter((a) => a !== undefined && a !== '')
    .join(',');
  await lmEval([
    '--model',
    process.env.LM_EVAL_MODEL ?? 'hf',
    '--model_args',
    modelArgs,
    '--tasks',
    tasks,
    '--batch_size',
    process.env.LM_EVAL_BATCH_SIZE ?? 'auto',
    '--output_path',
    out,
    ...(process.env.LM_EVAL_LIMIT === undefined ? [] : ['--limit', process.env.LM_EVAL_LIMIT]),
  ]);
  const report = JSON.parse(await readFile(await newestResults(out), 'utf8')) as {
    results?: Record<string, Record<string, unknown>>;
  };
  console.log(JSON.stringify(pickScores(report.results ?? {})));
} catch (err) {
  console.error(`eval-harness: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
} finally {
  await rm(out, { recursive: true, force: true });
}
