/**
 * A write interrupted by a crash leaves writeFile's temporary file beside its
 * target. The next start of that VM after an unclean stop removes it; until then
 * readdir does not show it.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { it } from "node:test";
import { tempDataDir, testVm } from "./helpers.ts";

it("temporary files left by a crash are cleaned when the VM next starts; a clean stop leaves nothing to clean", async () => {
  const dataDir = await tempDataDir("agentvm-interrupted-");
  const first = await testVm(dataDir, { name: "crashy" });
  await first.writeFile("/home/agentos/deep/er/kept.txt", "kept");
  const leftovers = [join(first.root, "home/agentos/deep/er/.agentvm-4242-7-q1w2e3r4.tmp"), join(first.root, "tmp/.agentvm-4242-8-zz.tmp")];
  for (const file of leftovers) await writeFile(file, "half a write");
  await mkdir(join(first.root, "home/agentos/deep/er/.agentvm-4242-9-dir.tmp")); // a directory is never one of ours: not removed
  assert.deepEqual(await first.readdir("/home/agentos/deep/er"), ["kept.txt"]);

  // `first` is never disposed: as far as the next start can tell, the server died under it.
  const second = await testVm(dataDir, { name: "crashy" });
  for (const file of leftovers) assert.equal(existsSync(file), false, `${file} survived the restart`);
  assert.equal(new TextDecoder().decode(await second.readFile("/home/agentos/deep/er/kept.txt")), "kept");
  assert.equal(existsSync(join(second.root, "home/agentos/deep/er/.agentvm-4242-9-dir.tmp")), true);

  await second.dispose();
  await writeFile(join(second.root, "tmp/.agentvm-1-1-after.tmp"), "made after a clean stop");
  const third = await testVm(dataDir, { name: "crashy" });
  // A clean stop means no walk at start (a guest cannot be mid-write while its VM is stopped, so this file is not a leftover of ours).
  assert.equal(existsSync(join(third.root, "tmp/.agentvm-1-1-after.tmp")), true);
  await first.dispose();
});
