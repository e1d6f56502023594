/**
 * Staging (src/sandbox/staging.ts) after a server was killed: its stage mounts
 * are left behind, and a new server reuses them by name. A writable stage (a
 * VM's root) is reused only if it still shows the same directory; one left
 * from a directory since made anew is replaced. Needs root, as staging does.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { it } from "node:test";
import { isMountPoint, release, stage } from "../src/sandbox/staging.ts";

const skip = process.getuid?.() === 0 ? false : "staging needs root";

it("a stale writable stage of another directory under the same name is replaced, and one of the same directory is reused", { skip }, async () => {
  const dir = await mkdtemp(join(tmpdir(), "agentvm-staging-"));
  const current = join(dir, "root");
  const old = join(dir, "old");
  await mkdir(current);
  await mkdir(old);
  await writeFile(join(current, "who"), "current");
  await writeFile(join(old, "who"), "old");
  const path = join("/run/agentvm/stage", createHash("sha256").update(current).digest("hex").slice(0, 24));
  try {
    // What a killed server leaves: the stage's name, bound to what was at that path before.
    await mkdir(path, { recursive: true, mode: 0o700 });
    execFileSync("mount", ["--bind", old, path]);
    assert.equal(await stage(current, false), path);
    assert.equal(await readFile(join(path, "who"), "utf8"), "current");
    await release(current);
    assert.equal(await isMountPoint(path), false);
    // Left by a killed server while it still shows the same directory: reused.
    await mkdir(path, { recursive: true, mode: 0o700 });
    execFileSync("mount", ["--bind", current, path]);
    assert.equal(await stage(current, false), path);
    assert.equal(await readFile(join(path, "who"), "utf8"), "current");
    await release(current);
  } finally {
    // Lazy unmounts until nothing is left at the stage path (a failed run may have stacked some).
    while (await isMountPoint(path)) execFileSync("umount", ["-l", path]);
    await rm(path, { recursive: true, force: true });
    await rm(dir, { recursive: true, force: true });
  }
});
