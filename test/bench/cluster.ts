/**
 * `npm run bench:cluster`: merge time of the ~1.1B-parameter three-party job
 * (TinyLlama-1.1B shapes, bf16, DP at rate 0.9, DPA off: the inputs of
 * bench:server, generated once into .bench/server/) on the embedded server
 * and on a cluster of 1, 2 and 3 `dppa serve --cluster` replicas sharing a
 * real nats-server and one data folder, side by side in one run. Prints
 * figures, asserts nothing about time.
 *
 * Each configuration gets a fresh data folder (and a fresh NATS store); the
 * three parties push their pruned deltas (to replicas in turn); the merge time
 * is from the last `upload_complete` event to the `merged` event. Servers run
 * from the sources (tsx), each with its default merge threads (min(2, cores)).
 *
 *   npm run bench:cluster [-- --layers 22 --configs embedded,1,2,3 --clean]
 *
 *   --layers N    fewer layers for a quick try (default 22: TinyLlama)
 *   --configs L   which configurations, comma-separated (default embedded,1,2,3)
 *   --clean       also delete the pruned deltas kept in .bench/cluster/ at the end
 */
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DppaClient, pruneToFile, type JobEvent } from '../../client/index.js';
import { startNatsServer, type NatsServer } from '../fixtures/nats-server.js';
import { metricValue, startServe, type ServeProcess } from '../fixtures/serve-process.js';
import { folderBytes, generateTinyLlama, tinyLlama } from './tinyllama-inputs.js';

const { values } = parseArgs({
  options: {
    layers: { type: 'string', default: '22' },
    configs: { type: 'string', default: 'embedded,1,2,3' },
    clean: { type: 'boolean' },
  },
});
const LAYERS = Number(values.layers);
if (!Number.isInteger(LAYERS) || LAYERS < 1)
  throw new RangeError(`--layers: expected an integer ≥ 1, got ${values.layers}`);
const configs = values.configs.split(',').map((c) => (c === 'embedded' ? 0 : Number(c)));
if (configs.some((c) => !Number.isInteger(c) || c < 0 || c > 8))
  throw new RangeError(`--configs: expected embedded or replica counts 1..8, got ${values.configs}`);

const root = new URL('../..', import.meta.url).pathname;
const benchDir = join(root, '.bench', 'cluster');
const deltaDir = join(benchDir, `deltas-${LAYERS}l`);
const runDir = join(benchDir, 'run');
const PARTIES = ['math', 'law', 'finance'] as const;
const RATE = 0.9;
const ADMIN = 'bench-cluster-admin-token-0123456789';
const load = (): string =>
  loadavg()
    .map((x) => x.toFixed(2))
    .join(' ');

const model = tinyLlama(LAYERS);
console.log(`load average at start: ${load()} (${availableParallelism()} cores: above that, other work competes)`);
const generated = await generateTinyLlama(model);
console.log(generated === undefined ? `reusing ${model.dir}` : `generated in ${generated.toFixed(1)} s`);
const base = join(model.dir, 'base');
const baseBytes = await folderBytes(base);

// The parties' deltas, pruned once and kept (pruning is not what this measures).
const deltas = PARTIES.map((p) => join(deltaDir, `${p}.dppa`));
const marker = join(deltaDir, 'pruned.json');
const spec = JSON.stringify({
  inputs: readFileSync(join(model.dir, 'generated.json'), 'utf8'),
  rate: RATE,
  method: 'dp',
});
if (!existsSync(marker) || readFileSync(marker, 'utf8') !== spec) {
  await rm(deltaDir, { recursive: true, force: true });
  await mkdir(deltaDir, { recursive: true });
  for (const [i, p] of PARTIES.entries()) {
    const t0 = performance.now();
    await pruneToFile({
      base,
      finetuned: join(model.dir, `ft${i + 1}`),
      rate: RATE,
      method: 'dp',
      out: deltas[i]!,
      workers: 2,
    });
    console.log(`pruned ${p} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  await writeFile(marker, spec);
}

interface Result {
  label: string;
  mergeSeconds: number;
  /** `merged.seconds` of the job: embedded, the merge itself; cluster, from the plan task to the commit. */
  reportedSeconds: number;
  /** Tensor tasks done per replica (cluster only). */
  perReplica: number[];
  load: string;
}

/** Runs the job on the embedded server (replicas = 0) or on a cluster of `replicas`. */
async function run(replicas: number): Promise<Result> {
  const label = replicas === 0 ? 'embedded (no NATS)' : `cluster, ${replicas} replica${replicas > 1 ? 's' : ''}`;
  await rm(runDir, { recursive: true, force: true });
  await mkdir(runDir, { recursive: true });
  let nats: NatsServer | undefined;
  const servers: ServeProcess[] = [];
  try {
    const args = ['--data', join(runDir, 'data'), '--grpc-port', '0', '--metrics-port', '0'];
    if (replicas > 0) nats = await startNatsServer();
    const cluster = nats === undefined ? [] : ['--nats', nats.url, '--cluster'];
    servers.push(
      ...(await Promise.all(
        Array.from({ length: Math.max(1, replicas) }, () =>
          startServe([...args, ...cluster], { DPPA_ADMIN_TOKEN: ADMIN }),
        ),
      )),
    );
    const admin = new DppaClient({ address: servers[0]!.address, token: ADMIN });
    try {
      const { job, tokens } = await admin.createJob({
        basePath: base,
        parties: [...PARTIES],
        rate: RATE,
        method: 'dp',
        label: `bench:cluster ${label}`,
      });
      const events: JobEvent[] = [];
      const watched = (async () => {
        for await (const e of admin.watchJob(job.id)) events.push(e);
      })();
      await Promise.all(
        PARTIES.map(async (p, i) => {
          const party = new DppaClient({ address: servers[i % servers.length]!.address, token: tokens[p]! });
          try {
            await party.push({ jobId: job.id, party: p, delta: deltas[i]! });
          } finally {
            party.close();
          }
        }),
      );
      await watched;
      const merged = events.find((e) => e.merged !== undefined);
      if (merged === undefined)
        throw new Error(
          `${label}: the job did not merge: ${events.find((e) => e.failed !== undefined)?.failed?.reason}`,
        );
      const lastUpload = Math.max(
        ...events.filter((e) => e.uploadComplete !== undefined).map((e) => Date.parse(e.time)),
      );
      const perReplica =
        replicas === 0
          ? []
          : await Promise.all(
              servers.map((s) => metricValue(s.metricsPort, 'dppa_cluster_tasks_total{kind="tensor",outcome="done"}')),
            );
      return {
        label,
        mergeSeconds: (Date.parse(merged.time) - lastUpload) / 1000,
        reportedSeconds: merged.merged!.seconds,
        perReplica,
        load: load(),
      };
    } finally {
      admin.close();
    }
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
    await nats?.close();
    await rm(runDir, { recursive: true, force: true });
  }
}

const results: Result[] = [];
for (const c of configs) {
  const r = await run(c);
  console.log(
    `${r.label}: merge ${r.mergeSeconds.toFixed(2)} s${r.perReplica.length > 0 ? `, tensors per replica ${r.perReplica.join(' / ')}` : ''} (load ${r.load})`,
  );
  results.push(r);
}

console.log(
  `\nCluster benchmark: TinyLlama-1.1B shapes (${LAYERS} layers), ${(model.params / 1e9).toFixed(3)}B parameters, bf16, base ${(baseBytes / 1e9).toFixed(2)} GB,`,
);
console.log(
  `${model.tensors.length} tensors; 3 parties, DP rate ${RATE}, DPA off; ${availableParallelism()} cores; every server with its default merge threads\n`,
);
const embedded = results.find((r) => r.label.startsWith('embedded'));
const rows = [
  [
    'configuration',
    'merge s',
    'MB/s of base',
    'vs embedded',
    'job merged.seconds',
    'tensors per replica',
    'load avg after',
  ],
];
for (const r of results) {
  rows.push([
    r.label,
    r.mergeSeconds.toFixed(2),
    (baseBytes / 1e6 / r.mergeSeconds).toFixed(0),
    embedded === undefined ? '' : `${(r.mergeSeconds / embedded.mergeSeconds).toFixed(2)}×`,
    r.reportedSeconds.toFixed(2),
    r.perReplica.join(' / '),
    r.load,
  ]);
}
const widths = rows[0]!.map((_, j) => Math.max(...rows.map((r) => r[j]!.length)));
rows.splice(
  1,
  0,
  widths.map((w) => '-'.repeat(w)),
);
for (const r of rows) console.log(`| ${r.map((c, j) => c.padEnd(widths[j]!)).join(' | ')} |`);
if (values.clean === true) await rm(benchDir, { recursive: true, force: true });
