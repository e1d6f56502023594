/**
 * The control channel as untrusted input (DESIGN §4): an init that stops
 * reading is cut off, not buffered without bound. The host observes it: init
 * is frozen from the host (SIGSTOP, as a hostile init that never reads would
 * behave), the server is flooded with stdin for it, and must end that VM with
 * a reason while another VM keeps answering and the VM starts afresh after.
 * One message that never ends, or one Node's reader cannot parse, ends that
 * VM's channel too, never the server.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { AgentVmError } from "../src/errors.ts";
import { MAX_DATA_CHARS, MAX_MESSAGE_BYTES } from "../src/init/protocol.ts";
import { ControlChannel } from "../src/sandbox/control-channel.ts";
import { SPAWN_PACE } from "../src/sandbox/process-table.ts";
import { sandboxProcessTree, tempDataDir, testVm, waitFor } from "./helpers.ts";

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

/**
 * A fake init: a real process on the other end of a real IPC channel, as one
 * that took init over would be (a guest cannot reach init's channel, so the
 * test plays it). The server's reader of that channel is what is tested.
 */
function fakeInit(script: string, node = false, onEvent: (event: unknown) => void = () => {}): { child: ChildProcess; violations: string[]; channel: ControlChannel } {
  const child = node
    ? spawn(process.execPath, ["-e", script], { stdio: ["ignore", "ignore", "inherit", "ipc"], detached: true })
    : spawn("/bin/sh", ["-c", script], { stdio: ["ignore", "ignore", "inherit", "ipc"], detached: true });
  const violations: string[] = [];
  const channel = new ControlChannel(child, { onEvent, onViolation: (reason) => violations.push(reason) });
  return { child, violations, channel };
}

/** Ends the fake init and what it started (its own process group). */
function stop(child: ChildProcess): void {
  try {
    process.kill(-child.pid!, "SIGKILL");
  } catch {
    // already ended
  }
}

describe("an init that sends what Node's IPC reader would buffer or choke on", () => {
  it("one endless line is cut off at the message cap, a line that is not JSON is a violation, not a crash; another VM keeps working", async () => {
    const dataDir = await tempDataDir();
    const other = await testVm(dataDir, { name: "neighbour" });
    assert.equal((await other.exec("/bin/echo", ["before"])).stdout, "before\n");

    // `yes | tr` never writes a newline: without the cap the server would buffer it until it died.
    const endless = fakeInit(`printf '{"t":"ready","pid":5}\\n' >&3; yes 0123456789abcdef | tr -d '\\n' >&3`);
    const garbage = fakeInit(`printf 'not json\\n' >&3; exec sleep 60`);
    try {
      await waitFor(() => endless.violations.length > 0, "the endless line to be cut off", 60_000);
      assert.equal(endless.violations.length, 1);
      const buffered = Number(/\((\d+) buffered/.exec(endless.violations[0]!)?.[1]);
      assert.match(endless.violations[0]!, new RegExp(`a message longer than ${MAX_MESSAGE_BYTES} bytes`));
      assert.ok(buffered > MAX_MESSAGE_BYTES && buffered <= MAX_MESSAGE_BYTES + 64 * 1024, `buffered ${buffered}`);
      await waitFor(() => garbage.violations.length > 0, "the line that is not JSON to be refused");
      assert.match(garbage.violations[0]!, /cannot parse/);
    } finally {
      endless.channel.close(new AgentVmError("PROTOCOL_VIOLATION", "test over"));
      garbage.channel.close(new AgentVmError("PROTOCOL_VIOLATION", "test over"));
      stop(endless.child);
      stop(garbage.child);
    }
    // This process (the server) is still here, and so is its other VM.
    assert.equal((await other.exec("/bin/echo", ["after"])).stdout, "after\n");
  });

  it("messages up to the cap and handles beside replies still arrive", async () => {
    // A large, legal message split over many reads, then a reply carrying a connected socket.
    const events: unknown[] = [];
    const init = fakeInit(
      `const net = require("node:net");
      process.send({ t: "output", pid: 7, fd: 1, data: "a".repeat(${MAX_DATA_CHARS}) });
      process.on("message", (message) => {
        const server = net.createServer((socket) => socket.end("through the handle"));
        server.listen(0, "127.0.0.1", () => {
          const socket = net.connect(server.address().port, "127.0.0.1", () => process.send({ t: "reply", id: message.id, ok: true }, socket));
        });
      });`,
      true,
      (event) => events.push(event),
    );
    const { channel } = init;
    try {
      const { handle } = await channel.request({ t: "connect", port: 1 });
      assert.ok(handle, "the reply came with its socket");
      const text = await new Promise<string>((resolve) => {
        let data = "";
        handle.on("data", (chunk) => (data += chunk));
        handle.on("end", () => resolve(data));
      });
      handle.destroy();
      assert.equal(text, "through the handle");
      await waitFor(() => events.length > 0, "the large output message");
      assert.equal((events[0] as { data: string }).data.length, MAX_DATA_CHARS);
      assert.deepEqual(init.violations, []);
    } finally {
      channel.close(new AgentVmError("SANDBOX_EXITED", "test over"));
      stop(init.child);
    }
  });
});
