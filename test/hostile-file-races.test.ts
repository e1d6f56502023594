/**
 * File actions resolve inside the VM under a hostile guest (DESIGN §4): a
 * guest flips a directory and a symlink to a host directory as fast as it can
 * while the API reads, writes, lists, stats, moves, makes and deletes through
 * that path thousands of times. The host-side observer is a marker directory
 * outside the VM: its file must never be read, listed, changed or joined by
 * anything, whatever each action's outcome.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { tempDataDir, testVm, waitFor } from "./helpers.ts";

const MARKER = "host-only-marker.txt";
const SECRET = "host secret: must never be read through a VM";
const ROUNDS = 600;

const markers: string[] = [];
after(async () => {
  await Promise.all(markers.map((dir) => rm(dir, { recursive: true, force: true })));
});

// d is the VM's directory (with secret.txt) or a symlink to the host directory, in turns; whatever
// the server made at d meanwhile is cleared first, so the VM's directory always comes back.
const FLIPPER = `
const fs = require("fs");
const [outside, flips] = process.argv.slice(2);
process.chdir("/home/agentos/race");
let n = 0;
for (;;) {
  try { if (fs.existsSync("real")) fs.rmSync("d", { recursive: true, force: true }); } catch {}
  try { fs.renameSync("real", "d"); } catch {}
  for (let i = 0; i < 20; i++) fs.existsSync("d");
  try { fs.renameSync("d", "real"); } catch {}
  try { fs.symlinkSync(outside, "d"); } catch {}
  if (++n % 1000 === 0) fs.writeFileSync(flips, String(n));
}
`;

describe("file actions against a guest flipping a directory and a symlink to a host path", () => {
  it("never read, list, write, move or delete anything outside the VM", async () => {
    const outside = await mkdtemp(join(tmpdir(), "agentvm-marker-"));
    markers.push(outside);
    await writeFile(join(outside, MARKER), SECRET);
    await writeFile(join(outside, "secret.txt"), SECRET);
    const before = await stat(join(outside, MARKER));
    const vm = await testVm(await tempDataDir(), { name: "racer" });
    // The VM's own copies under the names the host directory has.
    await vm.writeFile("/home/agentos/race/d/secret.txt", "inside");
    await vm.writeFile("/home/agentos/flipper.js", FLIPPER);
    const { pid } = await vm.spawn("node", ["/home/agentos/flipper.js", outside, "/tmp/flips"]);
    await waitFor(async () => (await vm.exists("/tmp/flips")) && Number(new TextDecoder().decode(await vm.readFile("/tmp/flips"))) > 0, "the guest to flip");
    const d = "/home/agentos/race/d";
    const outcomes = new Map<string, number>();
    const note = (what: string) => outcomes.set(what, (outcomes.get(what) ?? 0) + 1);
    try {
      for (let round = 0; round < ROUNDS; round++) {
        const actions: [string, () => Promise<unknown>][] = [
          ["readFile", async () => assert.notEqual(new TextDecoder().decode(await vm.readFile(`${d}/secret.txt`)), SECRET, "read the host's file")],
          ["readFile marker", async () => assert.fail(`read ${new TextDecoder().decode(await vm.readFile(`${d}/${MARKER}`))}`)],
          ["readdir", async () => assert.ok(!(await vm.readdir(d)).includes(MARKER), "listed the host directory")],
          ["stat marker", async () => assert.fail(`stat saw ${JSON.stringify(await vm.stat(`${d}/${MARKER}`))}`)],
          ["writeFile", () => vm.writeFile(`${d}/written-${round}.txt`, "guest data")],
          ["mkdir", () => vm.mkdir(`${d}/made-${round}/deeper`, { recursive: true })],
          ["move", () => vm.writeFile(`${d}/to-move-${round}`, "m").then(() => vm.move(`${d}/to-move-${round}`, `${d}/moved-${round}`))],
          ["move marker", () => vm.move(`${d}/${MARKER}`, `/home/agentos/stolen-${round}`)],
          ["deleteFile", () => vm.deleteFile(`${d}/written-${round}.txt`)],
          ["deleteFile marker", () => vm.deleteFile(`${d}/${MARKER}`)],
          ["deleteFile tree", () => vm.deleteFile(`${d}/made-${round}`, { recursive: true })],
        ];
        await Promise.all(
          actions.map(([name, action]) =>
            action().then(
              () => note(`${name} ok`),
              (error: { code?: string; name?: string }) => {
                if (error.name === "AssertionError") throw error;
                note(`${name} ${error.code}`);
              },
            ),
          ),
        );
      }
      const flips = Number(new TextDecoder().decode(await vm.readFile("/tmp/flips")));
      assert.ok(flips >= 1000, `the guest flipped ${flips} times`);
    } finally {
      await vm.killProcess(pid, "SIGKILL").catch(() => {});
    }
    // The host's directory is exactly as it was. Access time first (relatime: the first read after the write moves it).
    const afterStat = await stat(join(outside, MARKER));
    assert.equal(afterStat.atimeMs, before.atimeMs, "the marker was read");
    assert.equal(afterStat.mtimeMs, before.mtimeMs);
    assert.deepEqual((await readdir(outside)).sort(), [MARKER, "secret.txt"]);
    assert.equal(await readFile(join(outside, MARKER), "utf8"), SECRET);
    assert.equal(await readFile(join(outside, "secret.txt"), "utf8"), SECRET);
    // The race was real: actions met the directory both ways.
    assert.ok((outcomes.get("readFile ok") ?? 0) > 0, JSON.stringify(Object.fromEntries(outcomes)));
    assert.ok([...outcomes.keys()].some((key) => key.startsWith("readFile ") && key !== "readFile ok"), JSON.stringify(Object.fromEntries(outcomes)));
  });
});
