/**
 * What the server's receiving thread does per party, without gRPC: the CPU seconds of one stage of the upload over one
 * `.dppa` file (docs/performance.md, "Where the upload's CPU goes").
 *   npx tsx test/bench/upload-stages.ts FILE decode|crc|assemble|check|spool|all [--base DIR]
 * `--base` (the base checkpoint) is needed for fine-tuned values (DP and magnitude deltas by default): the check reads it.
 */
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { UploadRequest } from '../../proto/gen/dppa/v1/upload.js';
import { checkChunk } from '../../proto/sparse/chunk-codec.js';
import {
  DEFAULT_MAX_ABS_VALUE,
  DELTA_FILE_MAGIC,
  DeltaFileWriter,
  readDeltaHeader,
  TensorAssembler,
} from '../../proto/sparse/index.js';
import { Checkpoint } from '../../proto/safetensors/index.js';
import { receivedEncoding, UploadServiceKeepingRecords } from '../../server/uploads/received-record.js';
import { ContentRules, type TensorCheck } from '../../server/uploads/tensor-check.js';

const USAGE = 'usage: upload-stages.ts FILE decode|crc|assemble|check|spool|all [--base DIR]';
const args = process.argv.slice(2);
const baseArg = args.indexOf('--base');
const basePath = baseArg === -1 ? undefined : args[baseArg + 1];
if (baseArg !== -1 && basePath === undefined) throw new Error(`${USAGE}: --base needs a directory`);
if (baseArg !== -1) args.splice(baseArg, 2);
const [file, mode = 'all'] = args;
if (file === undefined || !['decode', 'crc', 'assemble', 'check', 'spool', 'all'].includes(mode))
  throw new Error(USAGE);
const header = await readDeltaHeader(file);
const checks = mode === 'check' || mode === 'all';
const spools = mode === 'spool' || mode === 'all';
if (checks && basePath === undefined && ContentRules.needsBase(header))
  throw new Error(`${USAGE}: ${file} carries fine-tuned values, whose check reads the base: give it with --base DIR`);
// As the upload session opens it: the job's base, keyed by its path (the session adds the base's fingerprint).
const base = basePath === undefined ? undefined : await Checkpoint.open(basePath);
const whole = readFileSync(file);
// Each record as the message grpc-js would deliver: an UploadRequest (field 2) in memory of its own.
const messages: Buffer[] = [];
for (let at = DELTA_FILE_MAGIC.length; ;) {
  const length = whole.readUInt32LE(at);
  at += 4;
  if (length === 0) break;
  const prefix: number[] = [0x12];
  for (let l = length; ; l >>>= 7) {
    if (l < 0x80) {
      prefix.push(l);
      break;
    }
    prefix.push((l & 0x7f) | 0x80);
  }
  const message = Buffer.allocUnsafe(prefix.length + length);
  message.set(prefix);
  whole.copy(message, prefix.length, at, at + length);
  messages.push(message);
  at += length;
}
// Only where the check runs: fine-tuned values need the base.
const rules = checks ? new ContentRules(header, DEFAULT_MAX_ABS_VALUE, base, basePath ?? '') : undefined;
const out = join(tmpdir(), `upload-stages-${process.pid}`);
mkdirSync(out, { recursive: true });
const closing: Promise<void>[] = [];
let assembler: TensorAssembler | undefined;
let check: TensorCheck | undefined;
let writer: DeltaFileWriter | undefined;
let files = 0;
const t0 = process.cpuUsage();
const w0 = performance.now();
try {
  // The first record is the header, which the upload takes apart from the tensors.
  for (const message of messages.slice(1)) {
    const req: UploadRequest = UploadServiceKeepingRecords.upload.requestDeserialize(message);
    const r = req.record!;
    if (mode === 'decode') continue;
    if (mode === 'crc') {
      if (r.chunk !== undefined) checkChunk(r.chunk);
      continue;
    }
    if (r.tensorBegin !== undefined) {
      assembler = new TensorAssembler({ entries: 'stream', maxPartition: header.levels.length, values: false });
      assembler.push(r);
      const plan = header.tensors.find((t) => t.name === r.tensorBegin!.name)!;
      check = rules?.tensor(plan);
      if (spools) {
        writer = await DeltaFileWriter.create(join(out, `${files++}.dppa`));
        await writer.write({ header: { ...header, options: {}, tensors: [plan], producer: 'upload-stages' } });
        await writer.write(r);
      }
    } else if (r.chunk !== undefined) {
      if (mode === 'assemble') assembler!.push(r);
      else if (checks) await check!.chunk(r.chunk, assembler!.push(r)!);
      if (spools) await writer!.write(r, receivedEncoding(r));
    } else if (r.tensorEnd !== undefined) {
      if (mode !== 'spool') assembler!.push(r);
      if (checks) check!.end(r.tensorEnd);
      if (spools) {
        await writer!.write(r);
        closing.push(writer!.close());
      }
    }
  }
  await Promise.all(closing);
  const u = process.cpuUsage(t0);
  console.log(
    `${mode}: CPU ${((u.user + u.system) / 1e6).toFixed(2)} s (user ${(u.user / 1e6).toFixed(2)}, system ${(u.system / 1e6).toFixed(2)}), wall ${((performance.now() - w0) / 1000).toFixed(2)} s, ${messages.length} messages`,
  );
} finally {
  rmSync(out, { recursive: true, force: true });
  await base?.close();
}
