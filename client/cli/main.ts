/**
 * `dppa`: the client's command line. `dppa serve` is the server's and is
 * dispatched by bin/dppa.js before this module loads.
 */
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { applyCommand } from './commands/apply.js';
import { evaluateCommand } from './commands/evaluate.js';
import { healthCommand } from './commands/health.js';
import { inspectCommand } from './commands/inspect.js';
import { jobCancelCommand, jobResumeCommand } from './commands/job-cancel-resume.js';
import { jobCreateCommand } from './commands/job-create.js';
import { jobListCommand } from './commands/job-list.js';
import { jobStatusCommand } from './commands/job-status.js';
import { jobWatchCommand } from './commands/job-watch.js';
import { pruneCommand } from './commands/prune.js';
import { pullCommand } from './commands/pull.js';
import { pushCommand } from './commands/push.js';
import type { Command } from './command.js';
import { didYouMean } from '../../proto/cli/did-you-mean.js';
import { describeFailure, EXIT } from './exit-codes.js';
import { packageVersion } from './version.js';

const commands: Command[] = [
  pruneCommand,
  applyCommand,
  inspectCommand,
  jobCreateCommand,
  jobStatusCommand,
  jobListCommand,
  jobWatchCommand,
  jobCancelCommand,
  jobResumeCommand,
  pushCommand,
  evaluateCommand,
  pullCommand,
  healthCommand,
];

/** Every command as typed, `serve` included (dispatched by bin/dppa.js). */
const NAMES = [...commands.map((c) => c.name), 'serve'];

/** `dppa job` alone, or with an unknown sub-command: the job commands. */
function groupUsage(group: string): string {
  const members = commands.filter((c) => c.name.startsWith(`${group} `));
  const width = Math.max(...members.map((c) => c.name.length)) + 2;
  return [
    `Usage: dppa ${group} <command> [options]`,
    '',
    'Commands:',
    ...members.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    '',
    `Run \`dppa ${group} <command> --help\` for the options of a command.`,
  ].join('\n');
}

function usage(): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 2;
  return [
    'Usage: dppa <command> [options]',
    '',
    'Federated merging of fine-tuned LLMs with DPPA (Dynamic Pruning Partition Amplification).',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    `  ${'serve'.padEnd(width)}run the aggregation server (dppa serve --help)`,
    '',
    'Run `dppa <command> --help` for the options of a command; `dppa --version` prints the version.',
    'Exit codes: 0 ok, 1 unexpected failure, 2 bad command line, 3 bad input data, 4 server error, 5 evaluation command failed, 130 interrupted.',
  ].join('\n');
}

/** Runs the command line `argv` (without node and script) and resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [first] = argv;
  if (first === undefined || first === '-h' || first === '--help' || first === 'help') {
    process.stdout.write(`${usage()}\n`);
    return first === undefined ? EXIT.usage : EXIT.ok;
  }
  if (first === '-V' || first === '--version' || first === 'version') {
    process.stdout.write(`${packageVersion()}\n`);
    return EXIT.ok;
  }
  // Longest match first, so that two-word commands ("job create") win over one-word ones.
  const command = commands
    .filter((c) => argv.slice(0, c.name.split(' ').length).join(' ') === c.name)
    .sort((a, b) => b.name.length - a.name.length)[0];
  if (command === undefined && commands.some((c) => c.name.startsWith(`${first} `))) {
    const help = argv[1] === '-h' || argv[1] === '--help';
    if (help) process.stdout.write(`${groupUsage(first)}\n`);
    else {
      const typed = `${first} ${argv[1] ?? ''}`;
      const what =
        argv[1] === undefined
          ? `${first}: which command?`
          : `unknown command ${JSON.stringify(typed)}${didYouMean(typed, NAMES)}`;
      process.stderr.write(`dppa: ${what}\n\n${groupUsage(first)}\n`);
    }
    return help ? EXIT.ok : EXIT.usage;
  }
  if (command === undefined) {
    // "dppa job-create" and "dppa jb create" are near "job create" too.
    const typed =
      commands.some((c) => c.name.startsWith(`${argv[1] ?? ''} `)) || argv[1] === undefined || argv[1].startsWith('-')
        ? first
        : `${first} ${argv[1]}`;
    const near = didYouMean(first, NAMES) || didYouMean(typed, NAMES) || didYouMean(first.replace('-', ' '), NAMES);
    process.stderr.write(`dppa: unknown command ${JSON.stringify(first)}${near}\n\n${usage()}\n`);
    return EXIT.usage;
  }
  const rest = argv.slice(command.name.split(' ').length);
  try {
    return await command.run(rest);
  } catch (err) {
    const { code, message } = describeFailure(err);
    process.stderr.write(`dppa ${command.name}: ${message}\n`);
    if (code === EXIT.usage) process.stderr.write(`(see dppa ${command.name} --help)\n`);
    return code;
  }
}

// Run directly (`node --import tsx client/cli/main.ts …`, as the tests do).
if (process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
