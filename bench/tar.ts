/**
 * Tar of a VM directory on the host (src/sandbox/vm-tar.ts), without a sandbox:
 * packing and extracting 5,000 small files (50 directories × 100 files of 100
 * bytes, five levels below the VM's root) through VmFilesystem, the layer every
 * tar route uses. Prints the median of ROUNDS runs of each, in ms.
 *
 *   node --conditions=agentvm-source bench/tar.ts
 */
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { VmFilesystem } from "../src/sandbox/filesystem.ts";
import { extractInto, packDirectory } from "../src/sandbox/vm-tar.ts";
import { median, now } from "./stats.ts";

const DIRS = 50;
const FILES_PER_DIR = 100;
const ROUNDS = 5;
const TREE = "/home/agentos/project/src/pkg";

const root = await mkdtemp(join(tmpdir(), "agentvm-bench-tar-"));
try {
  for (let d = 0; d < DIRS; d++) {
    const dir = join(root, TREE, `d${d}`);
    await mkdir(dir, { recursive: true });
    for (let f = 0; f < FILES_PER_DIR; f++) await writeFile(join(dir, `f${f}.txt`), "x".repeat(100));
  }
  const files = new VmFilesystem(root);
  const packMs: number[] = [];
  const extractMs: number[] = [];
  let archive = Buffer.alloc(0);
  for (let round = 0; round < ROUNDS; round++) {
    let start = now();
    const chunks: Buffer[] = [];
    for await (const chunk of await packDirectory(files, TREE)) chunks.push(chunk as Buffer);
    packMs.push(now() - start);
    archive = Buffer.concat(chunks);
    await rm(join(root, "home/agentos/copy"), { recursive: true, force: true });
    start = now();
    const result = await extractInto(files, "/home/agentos/copy", Readable.from([archive]));
    extractMs.push(now() - start);
    if (result.files !== DIRS * FILES_PER_DIR) throw new Error(`extracted ${result.files} files, expected ${DIRS * FILES_PER_DIR}`);
  }
  console.log(JSON.stringify({ files: DIRS * FILES_PER_DIR, archiveBytes: archive.byteLength, rounds: ROUNDS, packMedianMs: Math.round(median(packMs)), extractMedianMs: Math.round(median(extractMs)), packMs: packMs.map(Math.round), extractMs: extractMs.map(Math.round) }));
} finally {
  await rm(root, { recursive: true, force: true });
}
