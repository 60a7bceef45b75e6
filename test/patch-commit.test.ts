// The merged patch's commit step on real files: the pieces of every changed tensor are joined in
// the base's order; a missing piece refuses the commit (nothing written, an old patch untouched);
// a commit run again after the pieces folder was joined (renamed to `.joined`, partly removed, or
// gone) describes the file in place instead of joining a subset.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, it } from 'node:test';
import { PATCH_FILE_NAME } from '../proto/patch/index.js';
import { readDeltaHeader } from '../proto/sparse/index.js';
import { Checkpoint, type TensorData, writeCheckpoint } from '../proto/safetensors/index.js';
import { MergeOutput } from '../proto/gen/dppa/v1/jobs.js';
import {
  commitPatch,
  createPieces,
  joinedDir,
  mergeSpaceBytes,
  mergeSpaceLeft,
  MissingPieceError,
  PIECE_MAGIC,
  writePiece,
} from '../server/merge/patch-output.js';

const FINGERPRINT = 'f'.repeat(64);
const NAMES = ['a.weight', 'b.weight', 'c.weight', 'd.weight'];
// Tensors some party changed (the base's indices 0, 2 and 3); b.weight has no piece.
const CHANGED = new Set(['a.weight', 'c.weight', 'd.weight']);
const changed = (): Promise<ReadonlySet<string>> => Promise.resolve(CHANGED);

let root: string;
let base: Checkpoint;
let jobDir: string;
let pieces: string;
let patch: string;
let run = 0;

/** Distinct bytes per piece (stand-ins for a tensor's framed records: the commit copies them as they are). */
function pieceBytes(index: number): Uint8Array[] {
  return [Buffer.from(`piece ${index} first `), Buffer.from(`piece ${index} second`)];
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'dppa-patch-commit-'));
  const tensors: TensorData[] = NAMES.map((name, i) => ({
    name,
    dtype: 'F32',
    shape: [2],
    data: new Uint8Array(8).fill(i + 1),
  }));
  await writeCheckpoint(join(root, 'base'), tensors, {});
  base = await Checkpoint.open(join(root, 'base'));
  assert.deepEqual(
    base.tensors().map((t) => t.name),
    NAMES,
  );
});
after(async () => {
  await base.close();
  await rm(root, { recursive: true, force: true });
});
beforeEach(async () => {
  jobDir = join(root, `job-${run++}`);
  await mkdir(jobDir);
  pieces = join(jobDir, 'merged.tmp-x.patch');
  patch = join(jobDir, PATCH_FILE_NAME);
  await createPieces(pieces);
});

/** A stand-in for the SHA-256 of base tensor `index`: the commit copies it into the header. */
function pieceHash(index: number): Uint8Array {
  return new Uint8Array(32).fill(0xa0 + index);
}

/** Writes the pieces of the changed tensors (in an order other than the base's), but `skip`. */
async function writePieces(skip: readonly number[] = []): Promise<void> {
  for (const index of [3, 0, 2])
    if (!skip.includes(index)) await writePiece(pieces, index, pieceHash(index), pieceBytes(index));
}

function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

async function gone(path: string): Promise<boolean> {
  return readdir(path).then(
    () => false,
    (err: NodeJS.ErrnoException) => err.code === 'ENOENT',
  );
}

describe('commitPatch', () => {
  it('joins every changed tensor’s piece in the base’s order, then removes the pieces', async () => {
    await writePieces();
    const info = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    const bytes = await readFile(patch);
    assert.equal(info.path, PATCH_FILE_NAME);
    assert.equal(info.size, bytes.length);
    assert.equal(info.sha256, sha256(bytes));
    const body = Buffer.concat([0, 2, 3].flatMap(pieceBytes));
    const tail = Buffer.concat([body, Buffer.alloc(4)]);
    assert.deepEqual(bytes.subarray(bytes.length - tail.length), tail);
    // The header plans the changed tensors in the base's order, each with its piece's base hash.
    const header = await readDeltaHeader(patch);
    assert.deepEqual(
      header.tensors.map((t) => [t.name, Buffer.from(t.baseSha256).toString('hex')]),
      [0, 2, 3].map((i) => [NAMES[i], Buffer.from(pieceHash(i)).toString('hex')]),
    );
    assert.ok(await gone(pieces));
    assert.ok(await gone(joinedDir(pieces)));
    assert.deepEqual(await readdir(jobDir), [PATCH_FILE_NAME]);
  });

  it('refuses to join when a changed tensor’s piece is missing, writing nothing', async () => {
    await writePieces([2]);
    await assert.rejects(commitPatch(patch, pieces, base, FINGERPRINT, changed), (err: unknown) => {
      assert.ok(err instanceof MissingPieceError);
      assert.equal(err.tensor, 'c.weight');
      assert.equal(err.index, 2);
      return true;
    });
    assert.deepEqual((await readdir(jobDir)).sort(), ['merged.tmp-x.patch']);
    assert.deepEqual((await readdir(pieces)).sort(), ['0', '3']);
  });

  it('refuses a piece without the magic of this version (an older format) as missing, writing nothing', async () => {
    await writePieces();
    // A piece as an earlier version wrote it: the base tensor's hash first, no magic.
    await writeFile(join(pieces, '2'), Buffer.concat([pieceHash(2), ...pieceBytes(2)]));
    await assert.rejects(commitPatch(patch, pieces, base, FINGERPRINT, changed), (err: unknown) => {
      assert.ok(err instanceof MissingPieceError);
      assert.equal(err.tensor, 'c.weight');
      assert.equal(err.index, 2);
      assert.match(err.message, /magic/);
      return true;
    });
    assert.deepEqual((await readdir(jobDir)).sort(), ['merged.tmp-x.patch']);
  });

  it('merges a tensor whose piece has a bad magic again, then joins its new piece', async () => {
    await writePieces();
    await writeFile(join(pieces, '2'), Buffer.concat([Buffer.from('DPPApc\x00\x09', 'latin1'), pieceHash(2)]));
    const reruns: { name: string; index: number }[] = [];
    const info = await commitPatch(patch, pieces, base, FINGERPRINT, changed, async (t) => {
      reruns.push(t);
      await writePiece(pieces, t.index, pieceHash(t.index), pieceBytes(t.index));
    });
    assert.deepEqual(reruns, [{ name: 'c.weight', index: 2 }]);
    const bytes = await readFile(patch);
    assert.equal(info.sha256, sha256(bytes));
    const tail = Buffer.concat([...[0, 2, 3].flatMap(pieceBytes), Buffer.alloc(4)]);
    assert.deepEqual(bytes.subarray(bytes.length - tail.length), tail);
    assert.deepEqual(await readdir(jobDir), [PATCH_FILE_NAME]);
  });

  it('merges a tensor whose piece is missing again', async () => {
    await writePieces([0]);
    const reruns: number[] = [];
    await commitPatch(patch, pieces, base, FINGERPRINT, changed, async (t) => {
      reruns.push(t.index);
      await writePiece(pieces, t.index, pieceHash(t.index), pieceBytes(t.index));
    });
    assert.deepEqual(reruns, [0]);
    const header = await readDeltaHeader(patch);
    assert.deepEqual(
      header.tensors.map((t) => t.name),
      ['a.weight', 'c.weight', 'd.weight'],
    );
  });

  it('fails clearly, writing nothing, when the piece merged again is still unusable', async () => {
    await writePieces();
    const bad = Buffer.concat([pieceHash(2), ...pieceBytes(2)]);
    await writeFile(join(pieces, '2'), bad);
    await assert.rejects(
      commitPatch(patch, pieces, base, FINGERPRINT, changed, () => writeFile(join(pieces, '2'), bad)),
      (err: unknown) => {
        assert.ok(err instanceof MissingPieceError);
        assert.equal(err.index, 2);
        assert.match(err.message, /merged again/);
        return true;
      },
    );
    assert.deepEqual((await readdir(jobDir)).sort(), ['merged.tmp-x.patch']);
  });

  it('writes every piece starting with the magic, then the base tensor’s hash', async () => {
    await writePieces();
    const bytes = await readFile(join(pieces, '3'));
    assert.deepEqual(bytes.subarray(0, PIECE_MAGIC.length), Buffer.from(PIECE_MAGIC));
    assert.deepEqual(bytes.subarray(PIECE_MAGIC.length, PIECE_MAGIC.length + 32), Buffer.from(pieceHash(3)));
    assert.deepEqual(bytes.subarray(PIECE_MAGIC.length + 32), Buffer.concat(pieceBytes(3)));
  });

  it('leaves an existing patch untouched when a piece is missing', async () => {
    const old = Buffer.from('an earlier, good patch');
    await writeFile(patch, old);
    await writePieces([0]);
    await assert.rejects(commitPatch(patch, pieces, base, FINGERPRINT, changed), MissingPieceError);
    assert.deepEqual(await readFile(patch), old);
    assert.deepEqual((await readdir(jobDir)).sort(), [PATCH_FILE_NAME, 'merged.tmp-x.patch']);
  });

  it('run again after the pieces were removed, describes the file in place', async () => {
    await writePieces();
    const first = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    const again = await commitPatch(patch, pieces, base, FINGERPRINT, () =>
      Promise.reject(new Error('the expected set is not needed to describe')),
    );
    assert.deepEqual(again, first);
    assert.equal(again.sha256, sha256(await readFile(patch)));
  });

  it('run again after a crash that left the joined folder partly removed, never joins it', async () => {
    await writePieces();
    const first = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    const bytes = await readFile(patch);
    // The state a crash inside the removal leaves: the folder renamed, some pieces already gone.
    await createPieces(pieces);
    await writePieces();
    await rename(pieces, joinedDir(pieces));
    await rm(join(joinedDir(pieces), '0'));
    await rm(join(joinedDir(pieces), '3'));
    const again = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    assert.deepEqual(again, first);
    assert.deepEqual(await readFile(patch), bytes);
    assert.equal(again.sha256, sha256(bytes));
  });

  it('a racing commit that finds the folder renamed mid-way describes the joined file', async () => {
    await writePieces();
    const first = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    // A second commit listed the pieces, then the first renamed the folder (and removed a piece)
    // before the second read them: it must describe the file, not fail or join a subset.
    await createPieces(pieces);
    await writePieces();
    const racing = await commitPatch(patch, pieces, base, FINGERPRINT, async () => {
      await rename(pieces, joinedDir(pieces));
      await rm(join(joinedDir(pieces), '2'));
      return CHANGED;
    });
    assert.deepEqual(racing, first);
    assert.ok(!(await readdir(jobDir)).some((n) => n.startsWith(`${PATCH_FILE_NAME}.tmp-`)));
  });

  it('removes the temporary patch files that crashed commits left, joining or describing', async () => {
    // What a replica killed while writing leaves beside the patch (the cluster has no start-up sweep).
    const leftovers = [`${PATCH_FILE_NAME}.tmp-0123456789ab`, `${PATCH_FILE_NAME}.tmp-ba9876543210`];
    for (const n of leftovers) await writeFile(join(jobDir, n), 'half a patch');
    await writePieces();
    const first = await commitPatch(patch, pieces, base, FINGERPRINT, changed);
    assert.deepEqual(await readdir(jobDir), [PATCH_FILE_NAME]);
    // Run again (pieces gone: it describes the file): leftovers of a later crash go too.
    await writeFile(join(jobDir, leftovers[0]!), 'half a patch');
    assert.deepEqual(await commitPatch(patch, pieces, base, FINGERPRINT, changed), first);
    assert.deepEqual(await readdir(jobDir), [PATCH_FILE_NAME]);
  });
});

describe('mergeSpaceBytes (the room a paused merge waits for)', () => {
  it('counts the dense output once and the patch twice (pieces and joined file), each bounded by the base', () => {
    const base = 1600;
    const patchBound = 1700; // the base's bytes, plus a sixteenth for positions
    assert.equal(mergeSpaceBytes(MergeOutput.MERGE_OUTPUT_DENSE, base), base);
    assert.equal(mergeSpaceBytes(MergeOutput.MERGE_OUTPUT_PATCH, base), 2 * patchBound);
    assert.equal(mergeSpaceBytes(MergeOutput.MERGE_OUTPUT_BOTH, base), base + 2 * patchBound);
    assert.equal(mergeSpaceBytes(MergeOutput.MERGE_OUTPUT_UNSPECIFIED, base), base + 2 * patchBound);
  });
});

describe('mergeSpaceLeft (the room a merge paused midway still needs)', () => {
  it('subtracts the dense tensors written and the pieces folder’s files, and nothing once the output is gone', async () => {
    const baseBytes = 4096; // the job's recorded base size (the arithmetic does not read it)
    const work = join(jobDir, 'merged.tmp-x');
    await mkdir(work);
    // Tensors 0 and 2 written: 8 bytes each in the dense output, and their pieces.
    const written = Uint8Array.of(0b101);
    await writePiece(pieces, 0, pieceHash(0), pieceBytes(0));
    await writePiece(pieces, 2, pieceHash(2), pieceBytes(2));
    const pieceFiles = (await stat(join(pieces, '0'))).size + (await stat(join(pieces, '2'))).size;
    const both = MergeOutput.MERGE_OUTPUT_BOTH;
    const full = mergeSpaceBytes(both, baseBytes);
    assert.equal(await mergeSpaceLeft(both, baseBytes, base, written, work), full - 16 - pieceFiles);
    const dense = MergeOutput.MERGE_OUTPUT_DENSE;
    assert.equal(await mergeSpaceLeft(dense, baseBytes, base, written, work), baseBytes - 16);
    const patchOnly = MergeOutput.MERGE_OUTPUT_PATCH;
    assert.equal(
      await mergeSpaceLeft(patchOnly, baseBytes, base, written, work),
      mergeSpaceBytes(patchOnly, baseBytes) - pieceFiles,
    );
    // A failed run removed the output (the in-process backend): all of it again.
    await rm(work, { recursive: true });
    await rm(pieces, { recursive: true });
    assert.equal(await mergeSpaceLeft(both, baseBytes, base, written, work), full);
  });
});
