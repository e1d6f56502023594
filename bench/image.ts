/**
 * The VM image: how long ensureImage() takes and how big the result is.
 *
 * By default the machine's cached image is used: the time is a cached call in
 * a fresh process (what a server's first VM pays). With `--image` the image is
 * built from scratch into a fresh temporary AGENTVM_IMAGE_DIR (downloads about
 * 50 MB of packages), then removed.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { treeSize } from "../src/image/image.ts";
import { PINNED_NODE } from "./baseline-server.ts";

const execFileAsync = promisify(execFile);
const CHILD_SCRIPT = fileURLToPath(new URL("./image-child.ts", import.meta.url));

export interface ImageResult {
  /** "cached" or "fresh build". */
  mode: "cached" | "fresh build";
  ms: number;
  /** Bytes of regular files, each inode once. */
  sizeMb: number;
  id: string;
}

export async function benchImage(options: { build: boolean; log(message: string): void }): Promise<ImageResult> {
  const cacheDir = options.build ? await mkdtemp(join(tmpdir(), "agentvm-bench-image-")) : undefined;
  try {
    options.log(options.build ? `image: building from scratch into a fresh cache` : `image: cached ensureImage() in a fresh process`);
    const env = { ...process.env, ...(cacheDir ? { AGENTVM_IMAGE_DIR: cacheDir } : {}) };
    const { stdout } = await execFileAsync(PINNED_NODE, ["--conditions=agentvm-source", CHILD_SCRIPT], { env, maxBuffer: 1 << 20 });
    const result = JSON.parse(stdout) as { ms: number; root: string; id: string };
    return { mode: options.build ? "fresh build" : "cached", ms: result.ms, sizeMb: (await treeSize(result.root)) / 1e6, id: result.id };
  } finally {
    if (cacheDir) await rm(cacheDir, { recursive: true, force: true });
  }
}
