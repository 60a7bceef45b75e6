/**
 * The DPA search with the ONNX evaluator on the server, next to a party with
 * the remote one: a tiny causal LM built here as ONNX, whose initializers carry
 * the synthetic checkpoint's tensor names, scores the candidates on token-id
 * tasks. The recorded scores are checked against the evaluator run directly on
 * the dense checkpoint and on the candidate materialised by the client's
 * applyDelta (the server's weights must be exactly those), and the merge
 * against the chosen factors.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { credentials, status } from '@grpc/grpc-js';
import {
  applyDelta,
  DppaClient,
  DppaRpcError,
  EvaluatorKind,
  JobState,
  pruneToFile,
  type EvaluateFn,
} from '../client/index.js';
import { EvaluationServiceClient } from '../proto/gen/dppa/v1/evaluation.js';
import { Checkpoint } from '../proto/safetensors/index.js';
import { OnnxEvaluator } from '../server/dpa/onnx/index.js';
import { assertMerged } from './fixtures/expected-merge.js';
import { ADMIN, auth, startHarness, type Harness } from './fixtures/grpc-harness.js';
import { TINY, uniform, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { tinyLm } from './fixtures/tiny-lm.js';

const V = TINY.vocab;

let dir: string;
let base: string;
let fts: string[];
let modelPath: string;
let tasks: { copy: string; next: string };
let h: Harness;
let admin: DppaClient;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-dpa-onnx-'));
  ({ base, finetuned: fts } = await writeLlamaFamily(join(dir, 'family'), {
    shape: TINY,
    seed: 5,
    finetunes: 2,
    deltaScale: 0.05,
  }));
  modelPath = join(dir, 'tiny-lm.onnx');
  await writeFile(modelPath, tinyLm(V, TINY.hidden));
  const r = uniform(77);
  const ids = (n: number): number[] => Array.from({ length: n }, () => Math.floor(r() * V));
  tasks = { copy: join(dir, 'copy.jsonl'), next: join(dir, 'next.jsonl') };
  await writeFile(
    tasks.copy,
    Array.from({ length: 12 }, () => JSON.stringify({ prompt_ids: ids(5), answer_ids: ids(2) })).join('\n'),
  );
  await writeFile(
    tasks.next,
    Array.from({ length: 12 }, () => JSON.stringify({ prompt_ids: ids(3), answer_ids: ids(1) })).join('\n'),
  );
  h = await startHarness(join(dir, 'data'), { mergeWorkers: 0 });
  admin = new DppaClient({ address: h.address, token: ADMIN });
});
after(async () => {
  admin.close();
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** Scores of a checkpoint on the tasks, by the evaluator alone, as the server reports them (exp of the log-likelihood). */
async function directScores(checkpoint: string): Promise<Record<string, number>> {
  const ck = await Checkpoint.open(checkpoint);
  const e = await OnnxEvaluator.create({
    modelPath,
    checkpointShapes: Object.fromEntries(ck.tensors().map((t) => [t.name, t.shape])),
  });
  try {
    const scores = await e.evaluate(
      (name) => ck.readF32(name),
      Object.entries(tasks).map(([name, file]) => ({ name, file })),
      'log_likelihood',
    );
    return Object.fromEntries(Object.entries(scores).map(([t, s]) => [t, Math.exp(s)]));
  } finally {
    await e.close();
    await ck.close();
  }
}

function onnxSearch(extra: object = {}): object {
  return {
    upper: 1.5,
    evaluator: EvaluatorKind.EVALUATOR_KIND_ONNX,
    partyEvaluator: { law: EvaluatorKind.EVALUATOR_KIND_REMOTE },
    onnx: { modelPath, partyTasks: { math: { tasks } }, partyFinetuned: { math: fts[0]! }, metric: 'log_likelihood' },
    ...extra,
  };
}

describe('DPA search with the ONNX evaluator', () => {
  it('checks the evaluator settings and reads every file it needs at creation, naming the field, the file and the problem', async () => {
    const create = (search: object): Promise<unknown> =>
      admin
        .createJob({ basePath: base, parties: ['math', 'law'], rate: 0.8, dpa: { search } })
        .catch((e: unknown) => e);
    const cases: [object, RegExp][] = [
      [
        onnxSearch({
          onnx: {
            modelPath,
            partyTasks: { math: { tasks: { copy: join(dir, 'nowhere.jsonl') } } },
            partyFinetuned: { math: fts[0]! },
          },
        }),
        /dpa\.search\.onnx\.party_tasks\[math\]\.tasks\[copy\]: \S+nowhere\.jsonl does not exist on the server/,
      ],
      [
        onnxSearch({ onnx: { modelPath, partyTasks: { math: { tasks } } } }),
        /dpa\.search\.onnx\.party_finetuned\[math\]: required/,
      ],
      [
        onnxSearch({
          onnx: {
            modelPath: join(dir, 'none.onnx'),
            partyTasks: { math: { tasks } },
            partyFinetuned: { math: fts[0]! },
          },
        }),
        /dpa\.search\.onnx\.model_path: \S+none\.onnx does not exist/,
      ],
      [
        onnxSearch({
          onnx: { modelPath, partyTasks: { math: { tasks } }, partyFinetuned: { math: fts[0]! }, metric: 'bleu' },
        }),
        /dpa\.search\.onnx\.metric: expected exact_match or log_likelihood/,
      ],
      [onnxSearch({ step: -0.1 }), /dpa\.search\.step: must be positive/],
      [onnxSearch({ start: 20 }), /dpa\.search\.start: must lie in \[lower, upper\]/],
    ];
    // Files that exist but that the evaluator cannot use: read and checked at creation too, not after every upload.
    const file = async (name: string, text: string): Promise<string> => {
      await writeFile(join(dir, name), text);
      return join(dir, name);
    };
    const bpe = await file('bpe-tokenizer.json', '{"type": "bpe", "vocab": {}}');
    const notJson = await file('tokenizer.txt', 'a b c\n');
    const text = await file(
      'text.jsonl',
      '{"prompt_ids": [1, 2], "answer_ids": [3]}\n{"prompt": "2+2=", "answer": "4"}\n',
    );
    const outside = await file(
      'outside.jsonl',
      `{"prompt_ids": [1, 2], "answer_ids": [3]}\n{"prompt_ids": [1, ${V + 5}], "answer_ids": [3]}\n`,
    );
    const garbage = await file('garbage.onnx', 'not a model');
    const wide = (await writeLlamaFamily(join(dir, 'wide'), { shape: TINY, seed: 5, extraVocab: 2 })).finetuned[0]!;
    const math = (onnx: object): object =>
      onnxSearch({ onnx: { modelPath, partyTasks: { math: { tasks } }, partyFinetuned: { math: fts[0]! }, ...onnx } });
    const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
    cases.push(
      [
        math({ tokenizerPath: bpe }),
        new RegExp(`^dpa\\.search\\.onnx: ${esc(bpe)}: tokenizer type "bpe" is not supported \\(only "char"`),
      ],
      [math({ tokenizerPath: notJson }), new RegExp(`^dpa\\.search\\.onnx: ${esc(notJson)}: not valid JSON: `)],
      [
        math({ partyTasks: { math: { tasks: { text } } } }),
        new RegExp(`^dpa\\.search\\.onnx: ${esc(text)}:2: text examples need a tokenizer \\(set tokenizerPath\\)`),
      ],
      [
        math({ partyTasks: { math: { tasks: { outside } } } }),
        new RegExp(
          `^dpa\\.search\\.onnx: ${esc(outside)}:2: token id ${V + 5} is outside the model's vocabulary of ${V}$`,
        ),
      ],
      [math({ modelPath: garbage }), new RegExp(`^dpa\\.search\\.onnx: ${esc(garbage)}: not an ONNX model: `)],
      [
        math({ partyFinetuned: { math: wide } }),
        new RegExp(
          `^dpa\\.search\\.onnx: ${esc(wide)}, tensor "model\\.embed_tokens\\.weight": the fine-tuned reference has shape \\[${V + 2}, ${TINY.hidden}\\], the base \\[${V}, ${TINY.hidden}\\]$`,
        ),
      ],
    );
    for (const [search, message] of cases) {
      const err = await create(search);
      assert.ok(err instanceof DppaRpcError && err.code === status.INVALID_ARGUMENT, String(err));
      assert.match(err.details, message);
    }
    assert.equal((await admin.listJobs()).length, 0, 'no job was created');
  });

  it('scores math on the server and law on its machine, then merges with the chosen factors', async () => {
    const { job, tokens } = await admin.createJob({
      basePath: base,
      parties: ['math', 'law'],
      rate: 0.8,
      dpa: { search: onnxSearch() },
      merge: { weights: { math: 1, law: 0.5 } },
    });
    // The ONNX party has nothing to evaluate itself.
    const stream = new EvaluationServiceClient(h.address, credentials.createInsecure());
    const refused = await new Promise<{ code: number; details: string }>((resolve) => {
      const call = stream.evaluate(auth(tokens.math!));
      call.on('error', (e: { code: number; details: string }) => resolve(e));
      call.on('data', () => undefined);
      call.write({ hello: { jobId: job.id, party: 'math' } });
    });
    stream.close();
    assert.equal(refused.code, status.FAILED_PRECONDITION);
    assert.match(refused.details, /evaluated on the server \(ONNX\)/);

    const deltas = { math: join(dir, 'math.dppa'), law: join(dir, 'law.dppa') };
    await Promise.all(
      [0, 1].map((i) =>
        pruneToFile({ base, finetuned: fts[i]!, rate: 0.8, out: Object.values(deltas)[i]!, workers: 1 }),
      ),
    );
    const law: EvaluateFn = (_d, c) =>
      Promise.resolve(
        c.kind === 'dense' ? { t: 1 } : { t: Math.exp(-((c.factors[0]! - 1.2) ** 2) - (c.factors[1]! - 1) ** 2) },
      );
    await Promise.all(
      (['math', 'law'] as const).map(async (name, i) => {
        const client = new DppaClient({ address: h.address, token: tokens[name]! });
        try {
          await client.push({ jobId: job.id, party: name, delta: deltas[name] });
          if (name === 'law')
            await client.evaluate({
              jobId: job.id,
              party: name,
              base,
              finetuned: fts[i]!,
              delta: deltas.law,
              workDir: join(dir, 'work-law'),
              evaluate: law,
            });
        } finally {
          client.close();
        }
      }),
    );
    for await (const e of admin.watchJob(job.id)) if (e.failed !== undefined) assert.fail(e.failed.reason);
    const done = await admin.getJob(job.id);
    assert.equal(done.state, JobState.JOB_STATE_MERGED);

    const math = done.evaluations.filter((e) => e.party === 'math');
    // The dense reference, f1 from 1 and its first step, then at least one step of f2.
    assert.ok(math.length >= 4, `${math.length} evaluations`);
    assert.deepEqual(math[0]!.scores, await directScores(fts[0]!), 'dense reference: the fine-tuned checkpoint');
    assert.deepEqual(
      math.slice(1, 3).map((e) => e.factors),
      [
        [1, 1],
        [1.1, 1],
      ],
      'the default search, Method 2, from [1, 1]',
    );
    for (const e of [math[1]!, math.at(-1)!]) {
      const out = join(dir, `candidate-${e.seq}`);
      await applyDelta({ base, delta: deltas.math, out, factors: e.factors });
      assert.deepEqual(
        e.scores,
        await directScores(out),
        `candidate ${e.factors.join(', ')}: base + amplified delta, rounded to bf16`,
      );
    }
    const chosen = done.parties.find((p) => p.name === 'math')!;
    assert.ok(chosen.factorsFinal);
    assert.ok(
      math.some((e) => e.factors.join() === chosen.factors.join()),
      'the chosen factors were evaluated',
    );
    assert.deepEqual(done.parties.find((p) => p.name === 'law')!.factors, [1.2, 1]);
    const text = await (await fetch(`http://127.0.0.1:${h.server.metricsPort}/metrics`)).text();
    assert.match(text, new RegExp(`^dppa_dpa_evaluations_total\\{evaluator="onnx"\\} ${math.length}$`, 'm'));
    await assertMerged(base, join(dir, 'data', 'jobs', job.id, 'merged'), [
      { delta: deltas.math, weight: 1, factors: chosen.factors },
      { delta: deltas.law, weight: 0.5, factors: [1.2, 1] },
    ]);
  });
});
