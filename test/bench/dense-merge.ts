/**
 * The dense merge alone, in one process, on the deltas a `bench:server --keep` run left: the server's tensor
 * merges (merge-runner.ts), its output writer and its hashing, run as the merge driver runs them, without gRPC or
 * the job machinery. Prints per-stage wall times, CPU, and the process's resident set; for trying merge changes.
 *
 *   npx tsx test/bench/dense-merge.ts [--layers 4] [--workers 2] [--runs 1]
 */
import { mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { DeltaHeader } from '../../proto/gen/dppa/v1/sparse.js';
import { Checkpoint, SharedCheckpointWriter } from '../../proto/safetensors/index.js';
import { DeltaFileWriter, readDeltaFile } from '../../proto/sparse/index.js';
import { inlineRunner, workerRunner } from '../../server/merge/merge-runner.js';
import { MergeDriver } from '../../server/merge/merge-driver.js';
import { describeFiles } from '../../server/merge/output-files.js';
import { nodeCopySeconds } from './measure.js';
import { WrittenFilesHash } from '../../server/merge/written-hash.js';
import type { Contribution } from '../../server/merge/tensor-merge.js';

const { values } = parseArgs({
  options: {
    layers: { type: 'string', default: '4' },
    workers: { type: 'string', default: '2' },
    runs: { type: 'string', default: '1' },
  },
});
const root = new URL('../..', import.meta.url).pathname;
const benchDir = join(root, '.bench', 'server');
const basePath = join(benchDir, `tinyllama-${values.layers}l`, 'base');
const PARTIES = ['math', 'law', 'finance'];
const spoolDir = join(root, '.bench', 'dense-merge', 'spool');
const outRoot = join(root, '.bench', 'dense-merge', 'out');
const workers = Number(values.workers);

/** Splits each party's `.dppa` into one-tensor spool files, as the server's spool holds them (once). */
async function buildSpool(): Promise<Map<string, Map<string, string>>> {
  const parties = new Map<string, Map<string, string>>();
  for (const party of PARTIES) {
    const dir = join(spoolDir, party);
    const files = new Map<string, string>();
    parties.set(party, files);
    const done = await stat(join(dir, 'done')).then(
      () => true,
      () => false,
    );
    let header: DeltaHeader | undefined;
    let writer: DeltaFileWriter | undefined;
    let index = 0;
    if (!done) await mkdir(dir, { recursive: true });
    for await (const record of readDeltaFile(join(benchDir, 'run', `${party}.dppa`))) {
      if (record.header !== undefined) {
        header = record.header;
        if (done) {
          header.tensors.forEach((t, i) => t.sent && files.set(t.name, join(dir, `${i}.dppa`)));
          break;
        }
        continue;
      }
      if (record.tensorBegin !== undefined) {
        const name = record.tensorBegin.name;
        const h = header!;
        index = h.tensors.findIndex((t) => t.name === name);
        writer = await DeltaFileWriter.create(join(dir, `${index}.dppa`));
        await writer.write({ header: { ...h, options: {}, tensors: [h.tensors[index]!], producer: 'x' } });
        files.set(name, join(dir, `${index}.dppa`));
      }
      await writer!.write(record);
      if (record.tensorEnd !== undefined) await writer!.close();
    }
    if (!done) await writeFile(join(dir, 'done'), '');
  }
  return parties;
}

function vm(field: string): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'));
  return m === null ? Number.NaN : Number(m[1]) / 1024;
}

async function run(parties: Map<string, Map<string, string>>, i: number): Promise<Record<string, number>> {
  const base = await Checkpoint.open(basePath);
  const tmp = join(outRoot, `tmp-${i}`);
  const out = join(outRoot, `merged-${i}`);
  await rm(outRoot, { recursive: true, force: true });
  // bench:server's `node_io_floor_s`, run the same way (a child process) just before.
  const floor = nodeCopySeconds(basePath, join(outRoot, 'floor'));
  await SharedCheckpointWriter.layOut(tmp, out, base.layout, { copyExtraFilesFrom: basePath });
  const writer = await SharedCheckpointWriter.open(tmp, out, base.layout);
  const hash = new WrittenFilesHash(tmp, out, base.layout);
  const runner = workers === 0 ? inlineRunner(base) : workerRunner(basePath, workers);
  let maxRss = 0;
  const sampler = setInterval(() => (maxRss = Math.max(maxRss, vm('VmRSS'))), 50);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const names = base.tensors().map((t) => t.name);
  let next = 0;
  let writeS = 0;
  const lane = async (): Promise<void> => {
    while (next < names.length) {
      const name = names[next++]!;
      const contributions: Contribution[] = PARTIES.flatMap((p) => {
        const file = parties.get(p)!.get(name);
        return file === undefined ? [] : [{ party: p, file, weight: 1, factors: [1, 1, 1, 1, 1, 1, 1, 1] }];
      });
      const result =
        contributions.length === 0
          ? { bytes: await base.readRaw(name), release: () => undefined }
          : await runner.run({ name, contributions, outsideByMax: false }, base.info(name).numel);
      const tw = performance.now();
      await writer.writeTensor(name, result.bytes);
      hash.written(name);
      writeS += (performance.now() - tw) / 1000;
      result.release();
    }
  };
  await Promise.all(Array.from({ length: MergeDriver.lanes(workers) }, lane));
  const t1 = performance.now();
  await runner.close();
  await writer.close();
  const known = await hash.finish();
  await SharedCheckpointWriter.commit(tmp, out);
  const t2 = performance.now();
  const files = await describeFiles(out, known);
  const t3 = performance.now();
  clearInterval(sampler);
  await base.close();
  const cpu = process.cpuUsage(cpu0);
  const r = {
    tensors_s: (t1 - t0) / 1000,
    write_and_datasync_s_summed: writeS,
    commit_s: (t2 - t1) / 1000,
    hash_s: (t3 - t2) / 1000,
    total_s: (t3 - t0) / 1000,
    node_io_floor_s: floor,
    ratio: (t3 - t0) / 1000 / floor,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    max_rss_mib: maxRss,
    hwm_mib: vm('VmHWM'),
  };
  console.log(JSON.stringify({ ...r, sha: files.map((f) => f.sha256.slice(0, 12)).join(','), load: loadavg()[0] }));
  return r;
}

const parties = await buildSpool();
for (let i = 0; i < Number(values.runs); i++) await run(parties, i);
const names = await readdir(outRoot);
console.log(`outputs in ${outRoot}: ${names.join(', ')}`);
