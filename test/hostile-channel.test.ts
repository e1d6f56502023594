/**
 * The control channel as untrusted input (DESIGN §4): an init that stops
 * reading is cut off, not buffered without bound. The host observes it: init
 * is frozen from the host (SIGSTOP, as a hostile init that never reads would
 * behave), the server is flooded with stdin for it, and must end that VM with
 * a reason while another VM keeps answering and the VM starts afresh after.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { SPAWN_PACE } from "../src/sandbox/process-table.ts";
import { sandboxProcessTree, tempDataDir, testVm } from "./helpers.ts";

const CHUNK = new Uint8Array(1024 * 1024).fill(97);

function initPid(vmRoot: string): number {
  const pid = sandboxProcessTree(vmRoot).find((candidate) => {
    try {
      return readFileSync(`/proc/${candidate}/cmdline`, "utf8").startsWith("/opt/node/bin/node\0--max-semi-space-size=1");
    } catch {
      return false;
    }
  });
  assert.ok(pid, "init's host pid was found");
  return pid;
}

describe("a guest that stops init", () => {
  it("(kill -STOP 2 from inside) ends that VM's sandbox at the reply deadline; nothing waits forever, and the VM starts afresh", async () => {
    const dataDir = await tempDataDir();
    const vm = await testVm(dataDir, { name: "frozen" });
    await vm.spawn("/bin/sh", ["-c", "sleep 0.2; kill -STOP 2"]);
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    const warnings: string[] = [];
    const warn = console.warn;
    console.warn = (...args: unknown[]) => void warnings.push(args.join(" "));
    try {
      const error = await vm.exec("/bin/true").then(
        () => undefined,
        (failure: { code?: string }) => failure,
      );
      assert.ok(error, "a spawn on a stopped init fails instead of answering");
      assert.ok(["PROTOCOL_VIOLATION", "SANDBOX_EXITED"].includes(String(error.code)), `code ${error.code}`);
      assert.ok(warnings.some((line) => /did not answer a spawn request/.test(line)), `logged: ${warnings.join("\n")}`);
    } finally {
      console.warn = warn;
    }
    assert.equal((await vm.exec("/bin/echo", ["again"])).stdout, "again\n");
  });
});

describe("an init that stops reading its channel", () => {
  it("is cut off after a bounded amount of unread requests; the server and other VMs are unaffected", async () => {
    const dataDir = await tempDataDir();
    const [stuck, other] = await Promise.all([testVm(dataDir, { name: "stuck" }), testVm(dataDir, { name: "other" })]);
    const { pid } = await stuck.spawn("/bin/cat");
    await other.exec("/bin/true");
    const init = initPid(stuck.root);
    process.kill(init, "SIGSTOP");
    const warnings: string[] = [];
    const warn = console.warn;
    console.warn = (...args: unknown[]) => void warnings.push(args.join(" "));
    try {
      // 128 MiB of stdin, twice what the channel holds for an init that does not read.
      const writes = Array.from({ length: 128 }, () => stuck.writeProcessStdin(pid, CHUNK));
      const settled = await Promise.race([
        Promise.allSettled(writes),
        new Promise<"hung">((resolve) => setTimeout(() => resolve("hung"), 60_000).unref()),
      ]);
      assert.notEqual(settled, "hung", "the writes ended rather than waiting on a frozen init");
      const codes = new Set((settled as PromiseSettledResult<void>[]).map((result) => (result.status === "rejected" ? (result.reason as { code?: string }).code : "ok")));
      assert.ok(codes.has("PROTOCOL_VIOLATION"), `codes: ${[...codes].join(", ")}`);
      assert.ok(warnings.some((line) => /stopped reading its control channel/.test(line)), `logged: ${warnings.join("\n")}`);
    } finally {
      console.warn = warn;
      try {
        process.kill(init, "SIGCONT");
      } catch {
        // ended with its sandbox
      }
    }
    // The neighbour answers; the stuck VM starts a fresh sandbox on its next program.
    assert.equal((await other.exec("/bin/echo", ["fine"])).stdout, "fine\n");
    assert.equal((await stuck.exec("/bin/echo", ["again"])).stdout, "again\n");
  });
});

describe("a client churning spawns in one VM", () => {
  it("is paced (a burst, then a steady rate) while another VM keeps answering", async () => {
    const dataDir = await tempDataDir();
    const [churn, other] = await Promise.all([testVm(dataDir, { name: "churn", limits: { maxProcesses: 1024 } }), testVm(dataDir, { name: "calm" })]);
    await Promise.all([churn.exec("/bin/true"), other.exec("/bin/true")]);
    // The first exec took a token; let the bucket fill again.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const { burst, perSecond } = SPAWN_PACE;
    const count = burst + 2 * perSecond;
    const started = Date.now();
    const spawns = Promise.all(Array.from({ length: count }, () => churn.spawn("/bin/true")));
    // The other VM is served while the churn waits its turn.
    assert.equal((await other.exec("/bin/echo", ["served"])).stdout, "served\n");
    await spawns;
    const elapsed = Date.now() - started;
    // A lower bound only: past the burst, spawns cannot start faster than the pace.
    assert.ok(elapsed >= ((count - burst) / perSecond) * 1000 * 0.9, `${count} spawns took ${elapsed} ms`);
  });
});
