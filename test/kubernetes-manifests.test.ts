/**
 * deploy/kubernetes/: every manifest parses, and the fields that tie them
 * together agree: Service selectors and target ports against the pods,
 * StatefulSets against their headless Services, volume mounts against
 * volumes and claims, the admin token's Secret key and path against the
 * flag, the server's ports against its flags and probes, the probes' gRPC
 * service names against a real server's health service, the NATS URL
 * against the NATS Service, the ServiceMonitor against the Services and the
 * job label the alert rules expect.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { HealthCheckResponse_ServingStatus } from '../proto/gen/grpc/health/v1/health.js';
import { startHarness, type Harness } from './fixtures/grpc-harness.js';

const root = new URL('../deploy/kubernetes/', import.meta.url).pathname;

interface Port {
  name?: string;
  containerPort?: number;
  port?: number;
  targetPort?: string | number;
}
interface Probe {
  grpc?: { port: number; service?: string };
  httpGet?: { path: string; port: string | number };
}
interface Container {
  name: string;
  args?: string[];
  ports?: Port[];
  startupProbe?: Probe;
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  volumeMounts?: { name: string; mountPath: string }[];
}
interface Volume {
  name: string;
  persistentVolumeClaim?: { claimName: string };
  secret?: { secretName: string; items?: { key: string; path: string }[] };
  configMap?: { name: string };
}
interface PodTemplate {
  metadata: { labels: Record<string, string> };
  spec: { containers: Container[]; volumes?: Volume[] };
}
interface Manifest {
  file: string;
  apiVersion: string;
  kind: string;
  metadata: { name: string; labels?: Record<string, string> };
  spec?: {
    selector?: {
      matchLabels?: Record<string, string>;
      matchExpressions?: { key: string; operator: string; values: string[] }[];
    } & Record<string, string>;
    template?: PodTemplate;
    serviceName?: string;
    replicas?: number;
    clusterIP?: string;
    ports?: Port[];
    volumeClaimTemplates?: { metadata: { name: string }; spec: { accessModes: string[] } }[];
    accessModes?: string[];
    jobLabel?: string;
    endpoints?: { port: string; path: string }[];
  };
  stringData?: Record<string, string>;
  data?: Record<string, string>;
}

/** The manifests of one folder (common/ goes with each mode). */
async function load(dir: string): Promise<Manifest[]> {
  const out: Manifest[] = [];
  for (const name of (await readdir(join(root, dir))).filter((f) => f.endsWith('.yaml')).sort()) {
    const text = await readFile(join(root, dir, name), 'utf8');
    for (const doc of parseAllDocuments(text)) {
      assert.deepEqual(doc.errors, [], `${dir}/${name}`);
      const m = doc.toJS() as Manifest;
      assert.ok(m.apiVersion && m.kind && m.metadata.name, `${dir}/${name}: apiVersion, kind and metadata.name`);
      out.push({ ...m, file: `${dir}/${name}` });
    }
  }
  return out;
}

const matches = (selector: Record<string, string>, labels: Record<string, string>): boolean =>
  Object.entries(selector).every(([k, v]) => labels[k] === v);
const flag = (c: Container, name: string): string | undefined =>
  c.args?.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const one = <T>(items: T[], what: string): T => {
  assert.equal(items.length, 1, what);
  return items[0]!;
};

let dir: string;
let h: Harness;
let common: Manifest[];
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-k8s-'));
  h = await startHarness(join(dir, 'data'));
  common = await load('common');
});
after(async () => {
  await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** The serving status a real server gives for `service`. */
function health(service: string): Promise<HealthCheckResponse_ServingStatus> {
  return new Promise((resolve, reject) =>
    h.health.check({ service }, (err, res) => (err === null ? resolve(res.status) : reject(err))),
  );
}

for (const mode of ['embedded', 'cluster'] as const) {
  describe(`kubernetes manifests: ${mode} (with common/)`, () => {
    let all: Manifest[];
    before(async () => {
      all = [...common, ...(await load(mode))];
    });
    const of = (kind: string): Manifest[] => all.filter((m) => m.kind === kind);
    const workloads = (): Manifest[] => all.filter((m) => m.kind === 'StatefulSet' || m.kind === 'Deployment');
    const server = (): { w: Manifest; c: Container } => {
      const w = one(
        workloads().filter((m) => m.metadata.labels?.['app.kubernetes.io/name'] === 'dppa'),
        'one dppa workload',
      );
      return {
        w,
        c: one(
          w.spec!.template!.spec.containers.filter((c) => c.name === 'dppa'),
          'the dppa container',
        ),
      };
    };

    it('runs the server as the mode wants it', () => {
      const { w, c } = server();
      assert.equal(w.kind, mode === 'embedded' ? 'StatefulSet' : 'Deployment');
      assert.equal(c.args![0], 'serve');
      assert.equal(c.args!.includes('--cluster'), mode === 'cluster');
      if (mode === 'embedded') {
        assert.equal(w.spec!.replicas, 1, 'two embedded servers on one folder would corrupt it');
        const data = one(
          w.spec!.volumeClaimTemplates!.filter((t) => t.metadata.name === 'data'),
          'the data claim template',
        );
        assert.deepEqual(data.spec.accessModes, ['ReadWriteOnce']);
      } else {
        const claim = w.spec!.template!.spec.volumes!.find((v) => v.name === 'data')!.persistentVolumeClaim!.claimName;
        assert.deepEqual(
          one(
            of('PersistentVolumeClaim').filter((p) => p.metadata.name === claim),
            claim,
          ).spec!.accessModes,
          ['ReadWriteMany'],
        );
      }
    });

    it('ties every workload to its labels, volumes, claims, config maps and secrets', () => {
      for (const w of workloads()) {
        const t = w.spec!.template!;
        assert.ok(
          matches(w.spec!.selector!.matchLabels!, t.metadata.labels),
          `${w.metadata.name}: selector ⊆ pod labels`,
        );
        const volumes = new Set([
          ...(t.spec.volumes ?? []).map((v) => v.name),
          ...(w.spec!.volumeClaimTemplates ?? []).map((v) => v.metadata.name),
        ]);
        for (const c of t.spec.containers) {
          for (const m of c.volumeMounts ?? [])
            assert.ok(volumes.has(m.name), `${w.metadata.name}/${c.name}: volume ${m.name}`);
          assert.ok(
            c.resources?.requests?.cpu !== undefined && c.resources.requests.memory !== undefined,
            `${w.metadata.name}/${c.name}: resource requests`,
          );
          assert.ok(c.resources.limits?.memory !== undefined, `${w.metadata.name}/${c.name}: a memory limit`);
        }
        for (const v of t.spec.volumes ?? []) {
          if (v.persistentVolumeClaim)
            assert.ok(
              of('PersistentVolumeClaim').some((p) => p.metadata.name === v.persistentVolumeClaim!.claimName),
              `claim ${v.persistentVolumeClaim.claimName}`,
            );
          if (v.configMap)
            assert.ok(
              of('ConfigMap').some((p) => p.metadata.name === v.configMap!.name),
              `config map ${v.configMap.name}`,
            );
          if (v.secret) {
            const secret = one(
              of('Secret').filter((s) => s.metadata.name === v.secret!.secretName),
              v.secret.secretName,
            );
            for (const item of v.secret.items ?? [])
              assert.ok(item.key in (secret.stringData ?? secret.data ?? {}), `secret key ${item.key}`);
          }
        }
        if (w.kind === 'StatefulSet') {
          const svc = one(
            of('Service').filter((s) => s.metadata.name === w.spec!.serviceName),
            `${w.metadata.name}: service ${w.spec!.serviceName}`,
          );
          assert.equal(svc.spec!.clusterIP, 'None', `${svc.metadata.name} is headless`);
          assert.ok(matches(svc.spec!.selector!, t.metadata.labels), `${svc.metadata.name} selects ${w.metadata.name}`);
        }
      }
    });

    it('reads the admin token from the Secret at the path --admin-token-file names', () => {
      const { w, c } = server();
      const file = flag(c, 'admin-token-file')!;
      const mount = one(
        (c.volumeMounts ?? []).filter((m) => file.startsWith(`${m.mountPath}/`)),
        `a mount holding ${file}`,
      );
      const volume = w.spec!.template!.spec.volumes!.find((v) => v.name === mount.name)!;
      const item = one(
        volume.secret!.items!.filter((i) => `${mount.mountPath}/${i.path}` === file),
        'the secret item',
      );
      const secret = one(
        of('Secret').filter((s) => s.metadata.name === volume.secret!.secretName),
        'the secret',
      );
      assert.ok(
        (secret.stringData![item.key] ?? '').length >= 16,
        'the placeholder is long enough for the server to start',
      );
    });

    it('gives ports and probes that agree with the server flags, and Services that reach them', async () => {
      const { w, c } = server();
      const port = (name: string): number =>
        one(
          (c.ports ?? []).filter((p) => p.name === name),
          `port ${name}`,
        ).containerPort!;
      assert.equal(port('grpc'), Number(flag(c, 'grpc-port')));
      assert.equal(port('metrics'), Number(flag(c, 'metrics-port')));
      const probes = [c.startupProbe, c.readinessProbe, c.livenessProbe];
      for (const p of probes) {
        assert.ok(p?.grpc !== undefined, 'native gRPC probes');
        assert.equal(p.grpc.port, port('grpc'));
        // The real server's health service answers for the name each probe asks about.
        assert.equal(
          await health(p.grpc.service ?? ''),
          HealthCheckResponse_ServingStatus.SERVING,
          `probe service ${JSON.stringify(p.grpc.service)}`,
        );
      }
      assert.ok(c.args!.includes('--insecure'), 'native gRPC probes speak plaintext only');
      const services = of('Service').filter((s) => matches(s.spec!.selector!, w.spec!.template!.metadata.labels));
      assert.ok(services.length >= 1);
      for (const s of services)
        for (const p of s.spec!.ports!)
          assert.ok(
            c.ports!.some((cp) => cp.name === p.targetPort),
            `${s.metadata.name}: target port ${String(p.targetPort)}`,
          );
    });

    it('is scraped by the ServiceMonitor under job="dppa", as the alert rules expect', () => {
      const sm = one(of('ServiceMonitor'), 'one ServiceMonitor');
      const { w } = server();
      const selected = (s: Manifest): boolean =>
        (sm.spec!.selector!.matchExpressions ?? []).every(
          (e) => e.operator === 'In' && e.values.includes(s.metadata.labels?.[e.key] ?? ''),
        ) && matches(sm.spec!.selector!.matchLabels ?? {}, s.metadata.labels ?? {});
      const scraped = of('Service').filter(selected);
      const dppa = scraped.filter((s) => matches(s.spec!.selector!, w.spec!.template!.metadata.labels));
      assert.equal(dppa.length, 1, 'the server pods are scraped through exactly one Service (else every sample twice)');
      for (const s of scraped) {
        for (const e of sm.spec!.endpoints!)
          assert.ok(
            s.spec!.ports!.some((p) => p.name === e.port),
            `${s.metadata.name} has port ${e.port}`,
          );
      }
      assert.equal(dppa[0]!.metadata.labels![sm.spec!.jobLabel!], 'dppa');
      if (mode === 'cluster')
        assert.ok(
          scraped.some((s) => s.metadata.labels?.['app.kubernetes.io/name'] === 'nats'),
          'NATS is scraped too',
        );
    });

    if (mode === 'cluster') {
      it('points the replicas at the NATS Service, whose pods serve client and exporter ports', () => {
        const { c } = server();
        const url = new URL(flag(c, 'nats')!);
        const svc = one(
          of('Service').filter((s) => s.metadata.name === url.hostname),
          `service ${url.hostname}`,
        );
        const client = one(
          svc.spec!.ports!.filter((p) => p.port === Number(url.port)),
          `port ${url.port}`,
        );
        const nats = one(
          workloads().filter((m) => matches(svc.spec!.selector!, m.spec!.template!.metadata.labels)),
          'the NATS workload',
        );
        const containerPorts = nats.spec!.template!.spec.containers.flatMap((x) => x.ports ?? []);
        assert.ok(
          containerPorts.some((p) => p.name === client.targetPort),
          'client port',
        );
        assert.ok(
          containerPorts.some((p) => p.name === 'metrics'),
          'exporter port',
        );
        const conf = one(of('ConfigMap'), 'the NATS config').data!['nats.conf']!;
        assert.match(conf, new RegExp(`listen: 0\\.0\\.0\\.0:${url.port}`));
        const monitor = containerPorts.find((p) => p.name === 'monitor')!.containerPort!;
        assert.match(conf, new RegExp(`http: 0\\.0\\.0\\.0:${monitor}`));
      });
    }
  });
}
