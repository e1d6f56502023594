/**
 * File actions resolve inside the VM under a hostile guest (DESIGN §4): a
 * guest flips a directory and a symlink to a host directory as fast as it can
 * while the API reads, writes, lists, stats, moves, makes and deletes through
 * that path thousands of times, streams files in and out (appends too), and
 * packs and extracts tar archives there (readlink, symlink, chmod, confined
 * mkdir and writes). The host-side observer is a marker directory
 * outside the VM: its file must never be read, listed, changed or joined by
 * anything, whatever each action's outcome.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { VmFilesystem } from "../src/sandbox/filesystem.ts";
import { tempDataDir, testVm, waitFor } from "./helpers.ts";
import { archive } from "./tar-fixtures.ts";

const MARKER = "host-only-marker.txt";
const SECRET = "host secret: must never be read through a VM";
const ROUNDS = 600;
/** Streamed and tar actions whose race must have gone both ways (besides readFile's). */
const BOTH_WAYS = ["readFile", "openReadStream", "openWriteStream", "writeTar", "readTar"];

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** Runs one round of actions at once, counting each outcome (`<name> ok` or `<name> <code>`); a failed assertion fails the test. */
async function race(actions: [string, () => Promise<unknown>][], outcomes: Map<string, number>): Promise<void> {
  const note = (what: string) => outcomes.set(what, (outcomes.get(what) ?? 0) + 1);
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

/** The race was real for these actions: each succeeded sometimes and failed sometimes. */
function metBothWays(outcomes: Map<string, number>, names: string[]): void {
  const seen = JSON.stringify(Object.fromEntries(outcomes));
  for (const name of names) {
    assert.ok((outcomes.get(`${name} ok`) ?? 0) > 0, `${name}: ${seen}`);
    assert.ok([...outcomes.keys()].some((key) => key.startsWith(`${name} `) && key !== `${name} ok`), `${name}: ${seen}`);
  }
}

const markers: string[] = [];
after(async () => {
  await Promise.all(markers.map((dir) => rm(dir, { recursive: true, force: true })));
});

// d is the VM's directory (with secret.txt) or a symlink to the host directory, in turns; whatever
// the server made at d meanwhile is cleared first, so the VM's directory always comes back.
const FLIPPER = `
const fs = require("fs");
const [outside, flips, where = "/home/agentos/race"] = process.argv.slice(2);
process.chdir(where);
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
    const outsideMode = (await stat(outside)).mode;
    // Extracted into the race directory's parent: `d/` is made (mkdir within), written through
    // (a file, a symlink) and chmod-ed at the end, while the guest flips it.
    const tarball = await archive([
      { name: "d/", type: "directory", mode: 0o751 },
      { name: "d/secret.txt", content: "from tar", mode: 0o600 },
      { name: "d/tar-link", type: "symlink", linkname: "/etc/passwd" },
      { name: "d/sub/", type: "directory", mode: 0o711 },
      { name: "d/sub/file", content: "f", mode: 0o640 },
    ]);
    const vm = await testVm(await tempDataDir(), { name: "racer" });
    // The VM's own copies under the names the host directory has.
    await vm.writeFile("/home/agentos/race/d/secret.txt", "inside");
    await vm.writeFile("/home/agentos/flipper.js", FLIPPER);
    const { pid } = await vm.spawn("node", ["/home/agentos/flipper.js", outside, "/tmp/flips"]);
    await waitFor(async () => (await vm.exists("/tmp/flips")) && Number(new TextDecoder().decode(await vm.readFile("/tmp/flips"))) > 0, "the guest to flip");
    const d = "/home/agentos/race/d";
    const outcomes = new Map<string, number>();
    try {
      const actionsFor = (round: number): [string, () => Promise<unknown>][] => [
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
        ["openReadStream", async () => assert.notEqual((await collect((await vm.openReadStream(`${d}/secret.txt`)).stream)).toString(), SECRET, "streamed the host's file")],
        ["openReadStream marker", async () => assert.fail(`opened a stream of ${(await vm.openReadStream(`${d}/${MARKER}`)).size} bytes`)],
        ["openWriteStream", async () => pipeline(Readable.from([Buffer.from("streamed")]), await vm.openWriteStream(`${d}/streamed-${round}.txt`, { mode: 0o600 }))],
        ["openWriteStream append", async () => pipeline(Readable.from([Buffer.from("+")]), await vm.openWriteStream(`${d}/secret.txt`, { append: true }))],
        [
          "readTar",
          async () => {
            const packed = await collect(await vm.readTar(d));
            assert.ok(!packed.includes(SECRET) && !packed.includes(MARKER), "packed the host's directory");
          },
        ],
        ["writeTar", () => vm.writeTar("/home/agentos/race", Readable.from([tarball]))],
      ];
      for (let round = 0; round < ROUNDS; round++) await race(actionsFor(round), outcomes);
      // On a loaded machine a slow action (a whole tar extraction) may meet the flipped directory in
      // every round: it gets more rounds of its own, so the check below that the race was real for it
      // is about the race, not the load. Every one of them is held to the same assertions.
      const met = (name: string) => (outcomes.get(`${name} ok`) ?? 0) > 0 && [...outcomes.keys()].some((key) => key.startsWith(`${name} `) && key !== `${name} ok`);
      for (let round = ROUNDS; round < ROUNDS * 5; round++) {
        const unmet = actionsFor(round).filter(([name]) => BOTH_WAYS.includes(name) && !met(name));
        if (unmet.length === 0) break;
        await race(unmet, outcomes);
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
    assert.equal(afterStat.mode, before.mode, "the marker was chmod-ed");
    assert.equal((await stat(outside)).mode, outsideMode, "the host directory was chmod-ed");
    assert.deepEqual((await readdir(outside)).sort(), [MARKER, "secret.txt"]);
    assert.equal(await readFile(join(outside, MARKER), "utf8"), SECRET);
    assert.equal(await readFile(join(outside, "secret.txt"), "utf8"), SECRET);
    // The race was real: these actions met the directory both ways.
    metBothWays(outcomes, BOTH_WAYS);
  });

  // Tar extraction's own operations (not in the API by themselves), many more times than a VM
  // round trip allows: the flipper runs on the host, in a VM root served by VmFilesystem.
  it("chmod, symlink, readlink, appends and confined mkdir never act outside the VM", async () => {
    const outside = await mkdtemp(join(tmpdir(), "agentvm-marker-"));
    markers.push(outside);
    await writeFile(join(outside, "secret.txt"), SECRET);
    await symlink("host-target", join(outside, "link"));
    const root = await tempDataDir();
    await mkdir(join(root, "race", "real"), { recursive: true });
    await writeFile(join(root, "race", "real", "secret.txt"), "inside");
    await symlink("vm-target", join(root, "race", "real", "link"));
    const hostBefore = { dir: (await stat(outside)).mode, secret: await lstat(join(outside, "secret.txt")) };
    const files = new VmFilesystem(root, { readOnly: [] });
    await writeFile(join(root, "flipper.js"), FLIPPER);
    const flipper = spawn(process.execPath, [join(root, "flipper.js"), outside, join(root, "flips"), join(root, "race")], { stdio: "ignore" });
    const outcomes = new Map<string, number>();
    try {
      await waitFor(async () => Number(await readFile(join(root, "flips"), "utf8").catch(() => "0")) > 0, "the flipper to flip");
      const d = "/race/d";
      for (let round = 0; round < 500; round++) {
        const actions: [string, () => Promise<unknown>][] = [
          // Several at once: the window between the walk and the change is short.
          ...Array.from({ length: 8 }, (): [string, () => Promise<unknown>] => ["chmod dir", () => files.chmod(d, 0o751)]),
          ["chmod file", () => files.chmod(`${d}/secret.txt`, 0o600)],
          ["readlink", async () => assert.notEqual(await files.readlink(`${d}/link`), "host-target", "read the host's symlink")],
          ["symlink", () => files.symlink("vm-target", `${d}/link`, { within: "/race" })],
          [
            "append",
            async () => {
              const writer = await files.openWrite(`${d}/secret.txt`, { append: true, mode: 0o640 });
              await writer.write(new TextEncoder().encode("+"));
              await writer.commit();
            },
          ],
          ["mkdirWithin", () => files.mkdirWithin(`${d}/made-${round}`, "/race")],
        ];
        await race(actions, outcomes);
      }
    } finally {
      flipper.kill("SIGKILL");
    }
    assert.equal((await stat(outside)).mode, hostBefore.dir, "the host directory was chmod-ed");
    const secret = await lstat(join(outside, "secret.txt"));
    assert.equal(secret.mode, hostBefore.secret.mode, "the host's file was chmod-ed or replaced");
    assert.equal(secret.mtimeMs, hostBefore.secret.mtimeMs, "the host's file was appended to");
    assert.equal(await readFile(join(outside, "secret.txt"), "utf8"), SECRET);
    assert.equal(await readlink(join(outside, "link")), "host-target");
    assert.deepEqual((await readdir(outside)).sort(), ["link", "secret.txt"]);
    // The race was real: each action met the directory both ways.
    metBothWays(outcomes, ["chmod dir", "chmod file", "readlink", "symlink", "append", "mkdirWithin"]);
  });
});
