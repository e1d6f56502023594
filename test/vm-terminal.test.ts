/**
 * The embedded API's terminals and exec callbacks: Vm.openTerminal runs a
 * program on a real pseudo-terminal inside the VM, confined like every guest.
 */
import assert from "node:assert/strict";
import { before, describe, it } from "node:test";
import type { Vm, VmTerminal } from "agentvm";
import { rejection, tempDataDir, testVm, waitFor } from "./helpers.ts";

let vm: Vm;

before(async () => {
  vm = await testVm(await tempDataDir(), { name: "terminals", limits: { maxProcesses: 2 } });
});

function text(terminal: VmTerminal): { readonly value: string } {
  let value = "";
  const decoder = new TextDecoder();
  terminal.onData((data) => (value += decoder.decode(data, { stream: true })));
  return {
    get value() {
      return value;
    },
  };
}

describe("Vm.openTerminal", () => {
  it("runs the program on a terminal of its own, without capabilities, under the seccomp filter", async () => {
    const terminal = await vm.openTerminal({ command: "sh", args: ["-c", "tty; stty size; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; ps -o pid,sid,tty,comm"], cols: 90, rows: 20 });
    const out = text(terminal);
    assert.deepEqual(await terminal.exited, { exitCode: 0, signal: null });
    assert.match(out.value, /^\/dev\/pts\/\d+\r$/m);
    assert.match(out.value, /^20 90\r$/m);
    assert.match(out.value, /CapEff:\s+0{16}/);
    assert.match(out.value, /CapBnd:\s+0{16}/);
    assert.match(out.value, /NoNewPrivs:\s+1/);
    assert.match(out.value, /Seccomp:\s+2/);
    // The shell leads its own session on the terminal, as a login on a terminal would.
    const shell = new RegExp(`^\\s*${terminal.pid}\\s+${terminal.pid}\\s+pts/\\d+\\s+sh`, "m");
    assert.match(out.value, shell);
    // In the VM's control groups: its task count (and so limits.maxTasks, totalMemoryMb) includes the program.
    const before = await vm.usage();
    if (before.caps) {
      const sleeper = await vm.openTerminal({ command: "sleep", args: ["600"] });
      const during = await vm.usage();
      assert.ok(during.tasks! > before.tasks!, `tasks ${before.tasks} → ${during.tasks}`);
      await sleeper.close();
    }
  });

  it("keeps output that came before the first onData listener, delivers keys, resizes, signals", async () => {
    // --norc: Debian's /etc/bash.bashrc would set its own PS1.
    const terminal = await vm.openTerminal({ command: "bash", args: ["--norc"], env: { PS1: "ready> " } });
    await waitFor(async () => (await vm.getProcessLogs(terminal.pid)).output.length > 0, "the prompt in the log");
    const out = text(terminal);
    await waitFor(() => out.value.includes("ready> "), "the early prompt to reach the first listener");
    terminal.resize(132, 50);
    await terminal.write("stty size\r");
    await waitFor(() => out.value.includes("50 132"), `the new size (${JSON.stringify(out.value)})`);
    assert.throws(() => terminal.resize(1001, 10), { code: "INVALID_ARGUMENT" });
    assert.deepEqual([terminal.cols, terminal.rows], [132, 50]);
    const exits: unknown[] = [];
    terminal.onExit((exit) => exits.push(exit));
    await terminal.kill("SIGKILL");
    assert.deepEqual(await terminal.exited, { exitCode: 137, signal: "SIGKILL" });
    assert.deepEqual(exits, [{ exitCode: 137, signal: "SIGKILL" }]);
    assert.equal((await rejection(terminal.write("x"))).code, "EPIPE");
  });

  it("counts toward limits.maxProcesses and refuses bad options with typed errors", async () => {
    const first = await vm.openTerminal({ command: "sleep", args: ["60"] });
    const second = await vm.openTerminal({ command: "sleep", args: ["60"] });
    assert.equal((await rejection(vm.openTerminal())).code, "EAGAIN");
    await Promise.all([first.close(), second.close()]);
    assert.equal((await first.exited).signal, "SIGHUP");
    for (const options of [{ cols: 0 }, { rows: 5000 }, { cols: "80" }, { term: "vt100" }, { args: "-l" }]) {
      assert.equal((await rejection(vm.openTerminal(options as never))).code, "INVALID_ARGUMENT", JSON.stringify(options));
    }
    assert.equal((await rejection(vm.openTerminal({ command: "nonexistent-shell" }))).code, "ENOENT");
    assert.equal((await rejection(vm.openTerminal({ cwd: "/no/such/dir" }))).code, "ENOENT");
    assert.equal(vm.runningProcessCount(), 0);
  });
});

describe("Vm.exec callbacks", () => {
  it("delivers chunks as they come; a callback that throws kills the program and fails exec with its error", async () => {
    const seen: string[] = [];
    const running = vm.exec("sh", ["-c", "echo one; while [ ! -e /tmp/next ]; do sleep 0.05; done; echo two >&2"], {
      onStdout: (data) => seen.push(`out:${new TextDecoder().decode(data)}`),
      onStderr: (data) => seen.push(`err:${new TextDecoder().decode(data)}`),
    });
    await waitFor(() => seen.includes("out:one\n"), "the first chunk before the program ends");
    await vm.writeFile("/tmp/next", "");
    const result = await running;
    assert.deepEqual(seen, ["out:one\n", "err:two\n"]);
    assert.equal(result.stdout, "one\n");
    assert.equal(result.stderr, "two\n");

    const broken = await rejection(vm.exec("sh", ["-c", "echo hi; sleep 60"], { onStdout: () => { throw new Error("callback bug"); } }));
    assert.equal(broken.message, "callback bug");
    assert.equal(vm.runningProcessCount(), 0);
    assert.equal((await rejection(vm.exec("true", [], { onStdout: "no" as never }))).code, "INVALID_ARGUMENT");
  });
});
