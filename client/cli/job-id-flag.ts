/** The flags every `dppa job` command that acts on one job shares. */
import { text, toggle, type Flag } from '../../proto/cli/flag-table.js';

/** `--job ID`. */
export function jobFlag(help = "the job's id"): { job: Flag<string, true> } {
  return { job: text('ID', help, { required: true, group: 'Required' }) };
}

/** `--json`, in the Output section that ends every command's help. */
export function jsonFlag(help: string): { json: Flag<boolean, true> } {
  return { json: toggle(help, { group: 'Output' }) };
}
