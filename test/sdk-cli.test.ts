/**
 * The server-facing CLI commands, run as separate processes as a user would:
 * `--help` for each, exit code 2 for bad command lines, and, against an
 * in-test server, the JSON outputs, exit code 4 with the server's message,
 * and push/pull end to end.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Command } from '../client/cli/command.js';
import { jobCancelCommand } from '../client/cli/commands/job-cancel-resume.js';
import { jobCreateCommand } from '../client/cli/commands/job-create.js';
import { jobListCommand } from '../client/cli/commands/job-list.js';
import { jobStatusCommand } from '../client/cli/commands/job-status.js';
import { jobWatchCommand } from '../client/cli/commands/job-watch.js';
import { pullCommand } from '../client/cli/commands/pull.js';
import { pushCommand } from '../client/cli/commands/push.js';
import { describeFailure } from '../client/cli/exit-codes.js';
import { pruneToFile } from '../client/index.js';
import { JobState, MergeOutput, type JobEvent } from '../proto/gen/dppa/v1/jobs.js';
import { FakeDppaServer, type FakeServerOptions } from './fixtures/fake-dppa-server.js';
import { TINY, writeLlamaFamily } from './fixtures/synthetic-model.js';
import { CHILD_LIMITS } from './fixtures/child-limits.js';

const main = new URL('../client/cli/main.ts', import.meta.url).pathname;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI with a clean environment plus `env`. */
function dppa(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DPPA_')));
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', main, ...args],
      { env: { ...clean, ...env }, ...CHILD_LIMITS },
      (err, stdout, stderr) => {
        resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
      },
    );
  });
}

async function withServer(opts: FakeServerOptions, fn: (s: FakeDppaServer) => Promise<void>): Promise<void> {
  const s = await FakeDppaServer.start(opts);
  try {
    await fn(s);
  } finally {
    s.stop();
  }
}

const admin = { DPPA_ADMIN_TOKEN: 'admin-token' };
const COMMANDS = ['job create', 'job status', 'job list', 'job watch', 'job cancel', 'push', 'evaluate', 'pull'];

let dir: string;
let deltaFile: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dppa-sdk-cli-'));
  const fam = await writeLlamaFamily(join(dir, 'family'), { shape: TINY, seed: 5 });
  deltaFile = join(dir, 'a.dppa');
  await pruneToFile({ base: fam.base, finetuned: fam.finetuned[0]!, rate: 0.9, out: deltaFile, workers: 1 });
});
after(() => rm(dir, { recursive: true, force: true }));

describe('dppa server commands: command line', () => {
  it('prints help for every new command, listed in dppa --help and dppa job --help', async () => {
    const [top, group] = await Promise.all([dppa(['--help']), dppa(['job', '--help'])]);
    assert.equal(group.code, 0);
    for (const cmd of COMMANDS) {
      assert.match(top.stdout, new RegExp(`^  ${cmd} `, 'm'));
      if (cmd.startsWith('job ')) assert.match(group.stdout, new RegExp(`^  ${cmd} `, 'm'));
    }
    const helps = await Promise.all(COMMANDS.map((cmd) => dppa([...cmd.split(' '), '--help'])));
    for (const [i, r] of helps.entries()) {
      assert.equal(r.code, 0, COMMANDS[i]);
      assert.match(r.stdout, new RegExp(`^Usage: dppa ${COMMANDS[i]!} `), COMMANDS[i]);
      assert.match(r.stdout, /--server HOST:PORT/);
      assert.match(r.stdout, /Exit codes: 0 /);
    }
    assert.equal((await dppa(['job'])).code, 2);
    const unknown = await dppa(['job', 'frobnicate']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /unknown command "job frobnicate"/);
  });

  it('exits 2 naming the flag for bad command lines', async () => {
    const runs = await Promise.all([
      dppa(
        [
          'job',
          'create',
          '--server',
          'localhost:1',
          '--base',
          'b',
          '--parties',
          'a,b',
          '--rate',
          '0.9',
          '--dpa',
          'fixed:1,x',
        ],
        admin,
      ),
      dppa(['job', 'status', '--server', 'merge.example.org:50051', '--job', 'j'], admin),
      dppa(['push', '--server', 'localhost:1', '--job', 'j', '--party', 'a', '--delta', 'x.dppa']),
    ]);
    assert.deepEqual(
      runs.map((r) => r.code),
      [2, 2, 2],
    );
    assert.match(
      runs[0].stderr,
      /^dppa job create: --dpa: expected a number ≥ 0, got "x"\n\(see dppa job create --help\)/,
    );
    assert.match(
      runs[1].stderr,
      /refusing plaintext to merge\.example\.org:50051, which is not this machine: pass --tls .* or --insecure/,
    );
    assert.match(runs[2].stderr, /no token: pass --token/);
  });

  // The same checks in this process (spawning a process per case is slow): each is a UsageError, exit code 2.
  it('rejects every kind of bad command line with a message naming the flag', async () => {
    const byName = new Map<string, Command>(
      [
        jobCreateCommand,
        jobStatusCommand,
        jobListCommand,
        jobWatchCommand,
        jobCancelCommand,
        pushCommand,
        pullCommand,
      ].map((c) => [c.name, c]),
    );
    const cases: [string, string[], Record<string, string>, RegExp][] = [
      ['job create', ['--base', 'b', '--parties', 'a,b', '--rate', '0.9'], admin, /--server is required/],
      ['job create', ['--server', 'localhost:1', '--base', 'b', '--rate', '0.9'], admin, /--parties is required/],
      [
        'job create',
        ['--server', 'localhost:1', '--base', 'b', '--parties', 'a,b', '--rate', '0.9', '--weights', 'z=1'],
        admin,
        /--weights: "z" is not one of --parties/,
      ],
      [
        'job create',
        ['--server', 'localhost:1', '--base', 'b', '--parties', 'a,b', '--rate', '1.5'],
        admin,
        /--rate: expected a number ≥ 0 < 1/,
      ],
      [
        'job create',
        ['--server', 'localhost:1', '--base', 'b', '--parties', 'a,b', '--rate', '0.9', '--method', 'ties'],
        admin,
        /--method: expected one of dp, magnitude, owl, dare/,
      ],
      [
        'job create',
        ['--server', 'localhost:1', '--base', 'b', '--parties', 'a,b', '--rate', '0.9'],
        {},
        /no admin token: set DPPA_ADMIN_TOKEN or pass --admin-token-file/,
      ],
      ['job status', ['--server', 'merge.example.org', '--job', 'j'], admin, /--server: expected host:port/],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--admin-token-file', join(tmpdir(), 'no-such-token')],
        {},
        /--admin-token-file: cannot read/,
      ],
      ['job status', ['--server', 'localhost:1', '--job', 'j'], {}, /no token: pass --token or --admin-token-file/],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--token', 't', '--admin-token-file', 'f'],
        {},
        /--token and --admin-token-file: give one/,
      ],
      ['job status', ['--server', 'localhost:1'], admin, /--job is required/],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--timeout-ms', '0'],
        admin,
        /--timeout-ms: expected an integer ≥ 1/,
      ],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--retry-for', '90'],
        admin,
        /--retry-for: expected a duration with its unit \(e\.g\. 90s, 10m, 1h\), got "90"/,
      ],
      [
        'pull',
        ['--server', 'localhost:1', '--job', 'j', '--out', 'o', '--retry-for', 'soon'],
        admin,
        /--retry-for: expected a duration/,
      ],
      [
        'push',
        [
          '--server',
          'localhost:1',
          '--job',
          'j',
          '--party',
          'a',
          '--token',
          't',
          '--delta',
          'x.dppa',
          '--retry-for=-5m',
        ],
        {},
        /--retry-for: expected a duration/,
      ],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--tls-cert', 'c.pem'],
        admin,
        /--tls-cert and --tls-key: give both or neither/,
      ],
      [
        'job status',
        ['--server', 'localhost:1', '--job', 'j', '--tls-ca', join(tmpdir(), 'no-such-ca.pem')],
        admin,
        /^--tls-ca: cannot read .*no-such-ca\.pem/,
      ],
      [
        'job watch',
        ['--server', 'localhost:1', '--job', 'j', '--after-seq=-1'],
        admin,
        /--after-seq: expected an integer ≥ 0/,
      ],
      ['job list', ['--server', 'localhost:1', '--bogus'], admin, /Unknown option '--bogus'/],
      ['job cancel', ['--server', 'localhost:1'], admin, /--job is required/],
      [
        'push',
        ['--server', 'localhost:1', '--job', 'j', '--party', 'a', '--token', 't'],
        {},
        /give --base and --finetuned .* or --delta/,
      ],
      [
        'push',
        ['--server', 'localhost:1', '--job', 'j', '--token', 't', '--delta', 'x.dppa'],
        {},
        /--party is required/,
      ],
      [
        'push',
        ['--server', 'localhost:1', '--job', 'j', '--party', 'a', '--delta', 'x.dppa', '--method', 'dp'],
        { DPPA_TOKEN: 't' },
        /--delta sends a file as it is: drop --method/,
      ],
      [
        'push',
        [
          '--server',
          'localhost:1',
          '--job',
          'j',
          '--party',
          'a',
          '--base',
          'b',
          '--finetuned',
          'f',
          '--token',
          't',
          '--outside',
          'none',
        ],
        {},
        /--outside: expected one of dense, magnitude, skip/,
      ],
      [
        'push',
        [
          '--server',
          'localhost:1',
          '--job',
          'j',
          '--party',
          'a',
          '--base',
          'b',
          '--finetuned',
          'f',
          '--token',
          't',
          '--rate',
          '2',
        ],
        {},
        /--rate: expected a number ≥ 0 < 1/,
      ],
      ['pull', ['--server', 'localhost:1', '--job', 'j'], admin, /--out is required/],
    ];
    const saved = Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('DPPA_')));
    try {
      for (const [name, args, env, message] of cases) {
        for (const k of Object.keys(process.env)) if (k.startsWith('DPPA_')) delete process.env[k];
        Object.assign(process.env, env);
        const err = await byName
          .get(name)!
          .run(args)
          .then(
            () => undefined,
            (e: unknown) => e,
          );
        const what = `${name} ${args.join(' ')}`;
        assert.ok(err instanceof Error, `${what}: no error`);
        assert.equal(describeFailure(err).code, 2, `${what}: ${err.message}`);
        assert.match(err.message, message, what);
      }
    } finally {
      for (const k of Object.keys(process.env)) if (k.startsWith('DPPA_')) delete process.env[k];
      Object.assign(process.env, saved);
    }
  });

  it('pull refuses an existing output folder with exit code 2', async () => {
    await withServer({}, async (s) => {
      const r = await dppa(['pull', '--server', s.address, '--job', 'job-1', '--out', dir], admin);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /out: .* already exists; pull creates a new folder/);
    });
  });
});

describe('dppa server commands: against a server', () => {
  it('job create --json prints exactly the job id and the tokens, and sends the parsed settings', async () => {
    await withServer({}, async (s) => {
      const tokenFile = join(dir, 'admin.token');
      await writeFile(tokenFile, 'admin-token\n');
      const r = await dppa([
        'job',
        'create',
        '--server',
        s.address,
        '--admin-token-file',
        tokenFile,
        '--base',
        '/srv/base',
        '--parties',
        'a,b',
        '--rate',
        '0.9',
        '--dpa',
        'fixed:a=1.5,1;b=1.2,1',
        '--weights',
        'a=1,b=0.5',
        '--parties-may-download',
        '--output',
        'patch',
        '--label',
        'demo',
        '--json',
      ]);
      assert.equal(r.code, 0, r.stderr);
      const parsed = JSON.parse(r.stdout) as unknown;
      assert.deepEqual(parsed, { jobId: 'job-1', tokens: { a: 'token-a', b: 'token-b' } });
      assert.deepEqual(Object.keys(parsed as object), ['jobId', 'tokens']);
      const req = s.created[0]!;
      assert.deepEqual(req.dpa?.fixed?.perParty, { a: { factors: [1.5, 1] }, b: { factors: [1.2, 1] } });
      assert.deepEqual(req.merge, {
        weights: { a: 1, b: 0.5 },
        signElection: false,
        partiesMayDownload: true,
        output: MergeOutput.MERGE_OUTPUT_PATCH,
      });
      assert.equal(req.label, 'demo');
      const text = await dppa(
        ['job', 'create', '--server', s.address, '--base', '/srv/base', '--parties', 'a,b', '--rate', '0.9'],
        admin,
      );
      assert.match(text.stdout, /^job job-1 created/);
      assert.match(text.stdout, /^ {2}b {2}token-b$/m);
    });
  });

  it("job status --json gives the state in lower case; unknown jobs and bad tokens exit 4 with the server's message", async () => {
    await withServer(
      {
        job: {
          parties: [
            {
              name: 'a',
              tensorsReceived: 2,
              tensorsExpected: 30,
              bytesReceived: 100n,
              uploadComplete: false,
              factors: [],
              factorsFinal: false,
              stoppedReason: '',
              secureIndex: 0,
            },
          ],
        },
      },
      async (s) => {
        const [ok, text, missing, badToken, list, cancel] = await Promise.all([
          dppa(['job', 'status', '--server', s.address, '--job', 'job-1', '--json'], admin),
          dppa(['job', 'status', '--server', s.address, '--job', 'job-1', '--token', 'party-token']),
          dppa(['job', 'status', '--server', s.address, '--job', 'nope'], admin),
          dppa(['job', 'status', '--server', s.address, '--job', 'job-1'], { DPPA_ADMIN_TOKEN: 'wrong' }),
          dppa(['job', 'list', '--server', s.address, '--json'], admin),
          dppa(['job', 'cancel', '--server', s.address, '--job', 'nope'], admin),
        ]);
        assert.equal(ok.code, 0, ok.stderr);
        const job = JSON.parse(ok.stdout) as {
          jobId: string;
          state: string;
          parties: { name: string; bytesReceived: number }[];
          evaluations: unknown[];
          failureReason: string | null;
        };
        assert.equal(job.state, 'collecting');
        assert.deepEqual(
          job.parties.map((p) => [p.name, p.bytesReceived]),
          [['a', 100]],
        );
        assert.deepEqual(job.evaluations, []);
        assert.equal(job.failureReason, null);
        assert.equal(text.code, 0, text.stderr);
        assert.match(text.stdout, /^job job-1 {2}collecting/);
        assert.match(text.stdout, /a {2}2\/30 tensors {2}100 B {2}uploading/);
        assert.equal(missing.code, 4);
        assert.match(missing.stderr, /^dppa job status: GetJob failed: job "nope" not found \(NOT_FOUND\)$/m);
        assert.equal(badToken.code, 4);
        assert.match(badToken.stderr, /GetJob failed: invalid token \(UNAUTHENTICATED\); check the token/);
        assert.equal(list.code, 0, list.stderr);
        assert.equal((JSON.parse(list.stdout) as { state: string }[])[0]!.state, 'collecting');
        assert.equal(cancel.code, 4);
        const cancelled = await dppa(
          ['job', 'cancel', '--server', s.address, '--job', 'job-1', '--reason', 'wrong base', '--json'],
          admin,
        );
        assert.equal(cancelled.code, 0, cancelled.stderr);
        assert.deepEqual(JSON.parse(cancelled.stdout), {
          ...(JSON.parse(cancelled.stdout) as object),
          state: 'failed',
          failureReason: 'wrong base',
        });
      },
    );
  });

  it('job watch prints one JSON line per event and exits 0 on merged, 4 on failed', async () => {
    const ev = (seq: number, e: Partial<JobEvent>): JobEvent => ({ jobId: 'job-1', seq: BigInt(seq), time: '', ...e });
    const merged = [
      ev(1, { partyJoined: { party: 'a' } }),
      ev(2, { stateChanged: { from: JobState.JOB_STATE_COLLECTING, to: JobState.JOB_STATE_MERGING } }),
      ev(3, { mergeProgress: { tensorsDone: 1, tensorsTotal: 2 } }),
      ev(4, { stateChanged: { from: JobState.JOB_STATE_MERGING, to: JobState.JOB_STATE_MERGED } }),
      ev(5, { merged: { files: ['model.safetensors'], seconds: 1.5, patch: '' } }),
    ];
    await withServer({ events: merged, dropWatchAfterEvents: 2 }, async (s) => {
      const r = await dppa(['job', 'watch', '--server', s.address, '--job', 'job-1', '--json'], admin);
      assert.equal(r.code, 0, r.stderr);
      const lines = r.stdout
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { seq: number; type: string; to?: string });
      assert.deepEqual(
        lines.map((l) => l.seq),
        [1, 2, 3, 4, 5],
        'no event lost or repeated across the reconnect',
      );
      assert.deepEqual(
        lines.map((l) => l.type),
        ['partyJoined', 'stateChanged', 'mergeProgress', 'stateChanged', 'merged'],
      );
      assert.equal(lines[3]!.to, 'merged');
      const text = await dppa(['job', 'watch', '--server', s.address, '--job', 'job-1', '--after-seq', '3'], admin);
      assert.equal(text.stdout, '#4 state merging → merged\n#5 merged: 1 files in 1.5 s\n');
    });
    await withServer({ events: [ev(1, { failed: { reason: 'party b timed out' } })] }, async (s) => {
      const r = await dppa(['job', 'watch', '--server', s.address, '--job', 'job-1'], admin);
      assert.equal(r.code, 4);
      assert.match(r.stdout, /#1 failed: party b timed out/);
      assert.match(r.stderr, /job job-1 failed: party b timed out/);
    });
  });

  it('push --delta resumes after a drop; pull writes a verified folder', async () => {
    const data = Buffer.from(Array.from({ length: 4000 }, (_, i) => i % 256));
    await withServer(
      { dropUploadAfterTensors: 4, files: [{ path: 'model.safetensors', data }], dropDownloadAfterChunks: 1 },
      async (s) => {
        const push = await dppa(
          ['push', '--server', s.address, '--job', 'job-1', '--party', 'a', '--delta', deltaFile, '--json'],
          { DPPA_TOKEN: 'party-token' },
        );
        assert.equal(push.code, 0, push.stderr);
        const state = JSON.parse(push.stdout) as { complete: boolean; tensorsReceived: string[] };
        assert.equal(state.complete, true);
        assert.equal(s.uploads.length, 2);
        const out = join(dir, 'merged');
        const pull = await dppa(['pull', '--server', s.address, '--job', 'job-1', '--out', out, '--json'], admin);
        assert.equal(pull.code, 0, pull.stderr);
        assert.deepEqual(
          (JSON.parse(pull.stdout) as { files: { path: string; size: number }[] }).files.map((f) => [f.path, f.size]),
          [['model.safetensors', 4000]],
        );
        assert.deepEqual(await readFile(join(out, 'model.safetensors')), data);
        assert.equal(existsSync(`${out}.tmp-job-1`), false);
      },
    );
  });

  it('exits 3 for a delta that does not fit the job, and 4 when the server cannot be reached', async () => {
    await withServer({ job: { rate: 0.5 } }, async (s) => {
      const r = await dppa([
        'push',
        '--server',
        s.address,
        '--job',
        'job-1',
        '--party',
        'a',
        '--token',
        'party-token',
        '--delta',
        deltaFile,
      ]);
      assert.equal(r.code, 3);
      assert.match(r.stderr, /is pruned at rate 0\.9; job job-1 requires 0\.5/);
    });
    const gone = await FakeDppaServer.start();
    const address = gone.address;
    gone.stop();
    const r = await dppa(
      ['job', 'status', '--server', address, '--job', 'job-1', '--timeout-ms', '1500', '--retry-for', '2s'],
      admin,
    );
    assert.equal(r.code, 4);
    // Each wait is told, within the budget; then the last failure.
    assert.match(r.stderr, /^GetJob: server unavailable, retrying in \d\.\ds \(2\.0s left\)$/m);
    assert.match(r.stderr, /GetJob failed: .*\((UNAVAILABLE|DEADLINE_EXCEEDED)\)/);
    const none = await dppa(['job', 'status', '--server', address, '--job', 'job-1', '--retry-for', '0'], admin);
    assert.equal(none.code, 4);
    assert.doesNotMatch(none.stderr, /retrying/);
  });
});
