/**
 * The monitoring files checked against a real Prometheus (Debian's
 * `prometheus` package): `promtool check rules` and `promtool test rules` on
 * deploy/prometheus/, then a real `dppa serve` scraped every second by a real
 * Prometheus loading deploy/prometheus/rules.yml, a small job run through it
 * (one party pushes, the server merges), and every expression of the Grafana
 * dashboard and of the rules evaluated through Prometheus' query API: none
 * errors, the key ones return samples, every rule evaluates without error.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parse } from 'yaml';
import { DppaClient, JobState } from '../client/index.js';
import { freePort } from './fixtures/free-port.js';
import { startServe, type ServeProcess } from './fixtures/serve-process.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';

const deploy = new URL('../deploy/', import.meta.url).pathname;
const rulesFile = join(deploy, 'prometheus/rules.yml');
const ADMIN = 'prometheus-test-admin-token-0123';

function promtool(args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile('promtool', args, { cwd: join(deploy, 'prometheus') }, (err, stdout, stderr) =>
      resolve({ code: err === null ? 0 : Number(err.code), output: stdout + stderr }),
    );
  });
}

/** The PromQL of the dashboard's panels, with its variables set as Grafana would for this test's one server. */
async function dashboardExpressions(): Promise<{ title: string; expr: string }[]> {
  const dash = JSON.parse(await readFile(join(deploy, 'grafana/dppa.json'), 'utf8')) as {
    panels: { title: string; targets: { expr: string }[] }[];
  };
  return dash.panels.flatMap((p) =>
    p.targets.map((t) => ({
      title: p.title,
      expr: t.expr.replaceAll('$__rate_interval', '1m').replaceAll('$instance', '.+').replaceAll('$job', 'dppa'),
    })),
  );
}

/** Every `expr` of rules.yml, by rule name. */
async function ruleExpressions(): Promise<{ name: string; expr: string }[]> {
  const doc = parse(await readFile(rulesFile, 'utf8')) as {
    groups: { rules: { record?: string; alert?: string; expr: string }[] }[];
  };
  return doc.groups.flatMap((g) => g.rules.map((r) => ({ name: r.record ?? r.alert!, expr: r.expr })));
}

describe('Prometheus rules (promtool)', () => {
  it('pass promtool check rules', async () => {
    const r = await promtool(['check', 'rules', 'rules.yml']);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /SUCCESS: \d+ rules found/);
  });

  it('pass their unit tests (promtool test rules)', async () => {
    const r = await promtool(['test', 'rules', 'rules-test.yml']);
    assert.equal(r.code, 0, r.output);
    assert.match(r.output, /SUCCESS/);
  });
});

describe('Grafana dashboard', () => {
  it('imports as is: a data source variable every query uses, unique panel ids, every panel placed', async () => {
    const dash = JSON.parse(await readFile(join(deploy, 'grafana/dppa.json'), 'utf8')) as {
      uid: string;
      templating: { list: { name: string; type: string; query: unknown }[] };
      panels: {
        id: number;
        gridPos?: object;
        datasource: { uid: string };
        targets: { datasource: { uid: string }; expr: string }[];
      }[];
    };
    assert.ok(dash.uid !== '');
    assert.deepEqual(
      dash.templating.list.map((v) => [v.name, v.type]),
      [
        ['datasource', 'datasource'],
        ['job', 'query'],
        ['instance', 'query'],
      ],
    );
    assert.equal(new Set(dash.panels.map((p) => p.id)).size, dash.panels.length);
    for (const p of dash.panels) {
      assert.ok(p.gridPos !== undefined);
      for (const ds of [p.datasource, ...p.targets.map((t) => t.datasource)]) assert.equal(ds.uid, '${datasource}');
    }
  });
});

describe('a real Prometheus scraping a real dppa serve', () => {
  let dir: string;
  let serve: ServeProcess;
  let prometheus: ChildProcess;
  let promUrl: string;
  let prometheusLog = '';

  /** An instant query; throws with Prometheus' error when it fails. */
  async function query(expr: string): Promise<{ metric: Record<string, string>; value: [number, string] }[]> {
    const res = await fetch(`${promUrl}/api/v1/query?${new URLSearchParams({ query: expr }).toString()}`);
    const body = (await res.json()) as {
      status: string;
      error?: string;
      data?: { resultType: string; result: { metric: Record<string, string>; value: [number, string] }[] };
    };
    if (body.status !== 'success') throw new Error(`${expr}: ${body.error ?? res.status}`);
    return body.data!.result;
  }

  /** Polls `expr` until it returns a sample (Prometheus scrapes every second). */
  async function eventually(expr: string): Promise<void> {
    for (;;) {
      try {
        if ((await query(expr)).length > 0) return;
      } catch {
        // Not ready yet.
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'dppa-prometheus-'));
    serve = await startServe(['--data', join(dir, 'data'), '--grpc-port', '0', '--metrics-port', '0'], {
      DPPA_ADMIN_TOKEN: ADMIN,
    });
    const port = await freePort();
    promUrl = `http://127.0.0.1:${port}`;
    await writeFile(
      join(dir, 'prometheus.yml'),
      [
        'global: { scrape_interval: 1s, evaluation_interval: 1s }',
        `rule_files: [${JSON.stringify(rulesFile)}]`,
        'scrape_configs:',
        `  - { job_name: dppa, static_configs: [ { targets: ["127.0.0.1:${serve.metricsPort}"] } ] }`,
        '',
      ].join('\n'),
    );
    prometheus = spawn(
      'prometheus',
      [
        `--config.file=${join(dir, 'prometheus.yml')}`,
        `--storage.tsdb.path=${join(dir, 'tsdb')}`,
        `--web.listen-address=127.0.0.1:${port}`,
        '--log.level=warn',
      ],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    prometheus.stderr!.on('data', (d: Buffer) => (prometheusLog += d.toString()));
    prometheus.once('exit', (code) => (prometheusLog += `\n(prometheus exited ${code})`));
    await eventually('up{job="dppa"} == 1');
  });

  after(async () => {
    if (prometheus !== undefined && prometheus.exitCode === null && prometheus.signalCode === null) {
      const exited = new Promise((resolve) => prometheus.once('exit', resolve));
      prometheus.kill('SIGTERM');
      await exited;
    }
    await serve?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('runs a job, and every dashboard and rule expression evaluates, the key ones with samples', async () => {
    const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 9, finetunes: 1 });
    const admin = new DppaClient({ address: serve.address, token: ADMIN });
    try {
      const { job, tokens } = await admin.createJob({
        basePath: fam.base,
        parties: ['math'],
        rate: 0.8,
        label: 'prometheus',
      });
      const party = new DppaClient({ address: serve.address, token: tokens.math! });
      try {
        await party.push({ jobId: job.id, party: 'math', base: fam.base, finetuned: fam.finetuned[0]! });
      } finally {
        party.close();
      }
      for await (const event of admin.watchJob(job.id))
        if (event.failed !== undefined) assert.fail(event.failed.reason);
      assert.equal((await admin.getJob(job.id)).state, JobState.JOB_STATE_MERGED);
    } finally {
      admin.close();
    }
    // Scraped after the merge.
    await eventually('dppa_jobs{job="dppa", state="MERGED"} == 1');

    const dashboard = await dashboardExpressions();
    const rules = await ruleExpressions();
    assert.ok(
      dashboard.length >= 14 && rules.length >= 16,
      `${dashboard.length} dashboard and ${rules.length} rule expressions`,
    );
    const failures: string[] = [];
    const results = new Map<string, number>();
    for (const { title, expr } of [
      ...dashboard.map((d) => ({ title: d.title, expr: d.expr })),
      ...rules.map((r) => ({ title: r.name, expr: r.expr })),
    ]) {
      assert.ok(!expr.includes('$'), `${title}: a variable left in ${expr}`);
      try {
        results.set(title, Math.max(results.get(title) ?? 0, (await query(expr)).length));
      } catch (err) {
        failures.push(`${title}: ${(err as Error).message}`);
      }
    }
    assert.deepEqual(failures, [], failures.join('\n'));

    const key = [
      'Upload throughput',
      'Jobs by state',
      'Merge duration',
      'gRPC calls by method and code',
      'dppa:upload_bytes:rate5m',
      'dppa:jobs:max',
    ];
    for (const k of key) assert.ok((results.get(k) ?? 0) > 0, `${k} returned no sample`);
    const states = await query('max by (state) (dppa_jobs{job="dppa"})');
    assert.deepEqual(states.map((s) => s.metric.state).sort(), ['COLLECTING', 'DPA', 'FAILED', 'MERGED', 'MERGING']);
    const [merge] = await query('sum(increase(dppa_merge_duration_seconds_count{job="dppa"}[1h]))');
    assert.ok(Number(merge!.value[1]) > 0, 'one merge counted');
    const [bytes] = await query('sum(increase(dppa_upload_bytes_total{job="dppa"}[1h]))');
    assert.ok(Number(bytes!.value[1]) > 0, 'upload bytes counted');
    // No alert fires for a healthy server that merged its job.
    assert.deepEqual(await query('ALERTS{alertstate="firing"}'), []);

    // Prometheus itself evaluated every rule of the file, without error.
    for (;;) {
      const body = (await (await fetch(`${promUrl}/api/v1/rules`)).json()) as {
        data: { groups: { rules: { name: string; health: string; lastError?: string }[] }[] };
      };
      const all = body.data.groups.flatMap((g) => g.rules);
      assert.equal(all.length, rules.length, prometheusLog);
      const bad = all.filter((r) => r.health === 'err');
      assert.deepEqual(
        bad.map((r) => `${r.name}: ${r.lastError}`),
        [],
      );
      if (all.every((r) => r.health === 'ok')) break;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  });
});
