/**
 * End to end: processes in a VM. Every guest is a real Node.js process in the
 * real sandbox; nothing is mocked.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import type { Vm } from "agentvm";
import { collectOutput, rejection, sandboxProcessTree, tempDataDir, testVm, text, waitFor, waitForOutput, waitForPort } from "./helpers.ts";

// Set before any VM exists: a guest must never see the host's environment.
const CANARY = "AGENTVM_TEST_HOST_CANARY";
process.env[CANARY] = "host-secret-value";

const dataDir = await tempDataDir("agentvm-processes-");
const vm = await testVm(dataDir, { name: "procs" });
/** Variables the VM itself sets (TZ: guests run in UTC unless told otherwise). */
/** What every program of a VM starts with: home, path, locale, and where egress goes (init's proxies). */
const GUEST_ENV_KEYS = new Set(["HOME", "USER", "PATH", "LANG", "PWD", "TZ", "NPM_CONFIG_PREFIX", "NPM_CONFIG_DANGEROUSLY_ALLOW_ALL_SCRIPTS", "NODE_OPTIONS", "SHLVL", "_",
  ...["http_proxy", "https_proxy", "all_proxy", "no_proxy"].flatMap((name) => [name, name.toUpperCase()])]);

/** Runs a program to completion and returns its exit code and output. */
async function run(
  args: string[],
  options: { cwd?: string; env?: Record<string, string> } = {},
  target: Vm = vm,
): Promise<{ pid: number; code: number; stdout: string; stderr: string }> {
  const { pid } = await target.spawn("node", args, options);
  const output = collectOutput(target, pid);
  const code = await target.waitProcess(pid);
  await new Promise((resolve) => setImmediate(resolve));
  output.stop();
  return { pid, code, stdout: output.stdout, stderr: output.stderr };
}

async function script(name: string, source: string): Promise<string> {
  const path = `/home/agentos/${name}`;
  await vm.writeFile(path, source);
  return path;
}

async function assertRejects(promise: Promise<unknown>, code: string, ...mentions: (string | RegExp)[]): Promise<void> {
  // A promise, not a function: methods returning promises must reject, not throw.
  const error = await rejection(promise);
  assert.equal(error.code, code, `expected ${code}, got ${error.code}: ${error.message}`);
  for (const mention of mentions) assert.match(error.message, typeof mention === "string" ? new RegExp(escape(mention)) : mention);
}

const escape = (value: string) => value.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

describe("vm processes", () => {
  it("pids are the VM's own: the guest's process.pid, what ps shows inside, and not host pids", async () => {
    // v1 numbered processes from 1 in a table of its own; v2 pids come from the VM's PID namespace.
    const pidVm = await testVm(dataDir, { name: "pids" });
    await pidVm.writeFile("/home/agentos/pid.js", "console.log(`pid=${process.pid}`);\n");
    const first = await run(["pid.js"], {}, pidVm);
    const second = await run(["-e", "console.log(`pid=${process.pid}`)"], {}, pidVm);
    assert.equal(first.stdout, `pid=${first.pid}\n`, first.stderr);
    assert.equal(second.stdout, `pid=${second.pid}\n`, second.stderr);
    assert.notEqual(first.pid, second.pid);
    // Low numbers in a namespace of their own: bubblewrap is 1, init 2.
    assert.ok(first.pid > 2 && first.pid < 1000, `pid ${first.pid}`);
    const { pid } = await pidVm.spawn("sleep", ["30"]);
    const ps = await pidVm.exec("ps", ["-o", "pid=,comm="]);
    assert.match(ps.stdout, new RegExp(`^\\s*${pid} sleep$`, "m"), ps.stdout);
    assert.ok((await pidVm.listProcesses()).some((info) => info.pid === pid && info.running));
    await pidVm.killProcess(pid, "SIGKILL");
  });

  it("waitProcess returns the exit code: 0, process.exit(3), 1 for a throw, process.exitCode", async () => {
    const zero = await run(["-e", "console.log('fine')"]);
    assert.equal(zero.code, 0, zero.stderr);
    await script("exit3.js", "setTimeout(() => process.exit(3), 10);\n");
    assert.equal((await run(["exit3.js"])).code, 3);
    await script("throws.js", "throw new Error('boom from the guest');\n");
    const thrown = await run(["throws.js"]);
    assert.equal(thrown.code, 1);
    assert.match(thrown.stderr, /boom from the guest/);
    await script("exitcode.js", "process.exitCode = 7;\n");
    assert.equal((await run(["exitcode.js"])).code, 7);
    await script("reject.mjs", "await Promise.reject(new Error('unhandled rejection here'));\n");
    const rejected = await run(["reject.mjs"]);
    assert.equal(rejected.code, 1);
    assert.match(rejected.stderr, /unhandled rejection here/);
  });

  it("emits output events tagged stdout and stderr, and a processExit event", async () => {
    await script("streams.js", "process.stdout.write('to-out\\n'); process.stderr.write('to-err\\n'); console.error('more-err'); console.log('more-out');\n");
    const exits: { pid: number; exitCode: number }[] = [];
    const onExit = (event: { pid: number; exitCode: number }) => exits.push(event);
    vm.on("processExit", onExit);
    try {
      const result = await run(["streams.js"]);
      assert.equal(result.stdout, "to-out\nmore-out\n");
      assert.equal(result.stderr, "to-err\nmore-err\n");
      await waitFor(() => exits.some((event) => event.pid === result.pid), "the processExit event");
      assert.deepEqual(exits.find((event) => event.pid === result.pid), { pid: result.pid, exitCode: 0, signal: null });
    } finally {
      vm.off("processExit", onExit);
    }
  });

  it("passes argv, env and cwd to the guest (pooled and direct start)", async () => {
    await vm.mkdir("/srv/app", { recursive: true });
    const probe = "console.log(JSON.stringify({ argv: process.argv, env: process.env, cwd: process.cwd(), main: require.main === module }))";
    await vm.writeFile("/srv/app/probe.js", `${probe};\n`);
    const pooled = await run(["probe.js", "one", "two words", "--flag"], { cwd: "/srv/app", env: { FOO: "bar", EMPTY: "" } });
    assert.equal(pooled.code, 0, pooled.stderr);
    const seen = JSON.parse(pooled.stdout) as { argv: string[]; env: Record<string, string>; cwd: string; main: boolean };
    assert.deepEqual(seen.argv.slice(1), ["/srv/app/probe.js", "one", "two words", "--flag"]);
    assert.equal(seen.cwd, "/srv/app");
    assert.equal(seen.main, true, "require.main === module in a guest script");
    assert.equal(seen.env.FOO, "bar");
    assert.equal(seen.env.EMPTY, "");
    assertNoHostEnv(seen.env, ["FOO", "EMPTY"]);

    // A node flag before the script starts node directly with the user's command line.
    const direct = await run(["--no-warnings", "/srv/app/probe.js", "x"], { cwd: "/srv/app", env: { FOO: "direct" } });
    assert.equal(direct.code, 0, direct.stderr);
    const seenDirect = JSON.parse(direct.stdout) as typeof seen;
    assert.deepEqual(seenDirect.argv.slice(1), ["/srv/app/probe.js", "x"]);
    assert.equal(seenDirect.cwd, "/srv/app");
    assert.equal(seenDirect.main, true);
    assert.equal(seenDirect.env.FOO, "direct");
    assertNoHostEnv(seenDirect.env, ["FOO"]);

    // A relative cwd is under /home/agentos; a guest-provided HOME/PATH wins over the defaults.
    await vm.mkdir("/home/agentos/sub", { recursive: true });
    // The program is found on the PATH it is given, as with execvp: name node by its path here.
    const relative = await vm.exec("/opt/node/bin/node", ["-e", "console.log(process.cwd(), process.env.PATH)"], { cwd: "sub", env: { PATH: "/custom/bin" } });
    assert.equal(relative.stdout, "/home/agentos/sub /custom/bin\n", relative.stderr);
    // A program named relative to its cwd (not init's) is found there and keeps its name as argv[0].
    await vm.mkdir("/srv/tools", { recursive: true });
    await vm.writeFile("/srv/tools/run.sh", "#!/bin/sh\necho \"$0 in $(pwd)\"\n", { mode: 0o755 });
    const script = await vm.exec("./run.sh", [], { cwd: "/srv/tools" });
    assert.equal(script.stdout, "./run.sh in /srv/tools\n", script.stderr);
  });

  it("node -e, node -p and ESM programs run", async () => {
    const evaluated = await run(["-e", "console.log(21 * 2, typeof require, process.argv.length)", "arg1"]);
    assert.equal(evaluated.stdout, "42 function 2\n", evaluated.stderr);
    const printed = await run(["-p", "'printed ' + (1 + 1)"]);
    assert.equal(printed.stdout, "printed 2\n", printed.stderr);
    await vm.writeFile("/home/agentos/esm/util.mjs", "export default function shout(s) { return s.toUpperCase(); }\n");
    await vm.writeFile(
      "/home/agentos/esm/main.mjs",
      "import shout from './util.mjs';\nimport { basename } from 'node:path';\nconsole.log(shout('esm works'), basename(import.meta.filename), process.pid > 0);\n",
    );
    const esm = await run(["esm/main.mjs"]);
    assert.equal(esm.stdout, "ESM WORKS main.mjs true\n", esm.stderr);
  });

  it("stdin: writeProcessStdin and closeProcessStdin reach a guest that echoes", async () => {
    await script(
      "echo.js",
      "let got = ''; process.stdin.setEncoding('utf8');\n" +
        "process.stdin.on('data', (d) => { got += d; process.stdout.write('echo:' + d.toUpperCase()); });\n" +
        "process.stdin.on('end', () => { console.log('\\nEND ' + got.length); });\n",
    );
    const { pid } = await vm.spawn("node", ["echo.js"]);
    const output = collectOutput(vm, pid);
    try {
      await vm.writeProcessStdin(pid, "hello ");
      await waitFor(() => output.stdout.includes("echo:HELLO "), "the first echo");
      await vm.writeProcessStdin(pid, new TextEncoder().encode("bytes\n"));
      vm.closeProcessStdin(pid);
      assert.equal(await vm.waitProcess(pid), 0, output.stderr);
      await waitFor(() => output.stdout.includes("END"), "the end marker");
      assert.match(output.stdout, /echo:HELLO echo:BYTES\n\nEND 12\n$/);
    } finally {
      output.stop();
    }
    await assertRejects(vm.writeProcessStdin(pid, "late"), "EPIPE", `${pid}`);
  });

  it("killProcess: SIGTERM → 143, a SIGTERM handler can clean up and exit 0, SIGKILL → 137", async () => {
    await script("idle.js", "console.log('ready'); setInterval(() => {}, 1000);\n");
    const term = await vm.spawn("node", ["idle.js"]);
    await waitForOutput(vm, term.pid, /ready/);
    await vm.killProcess(term.pid, "SIGTERM");
    assert.equal(await vm.waitProcess(term.pid), 143);

    await script(
      "graceful.js",
      "const fs = require('fs');\n" +
        "process.on('SIGTERM', () => { fs.writeFileSync('/home/agentos/cleaned-up.txt', 'bye'); console.log('cleaning'); process.exit(0); });\n" +
        "console.log('ready'); setInterval(() => {}, 1000);\n",
    );
    const graceful = await vm.spawn("node", ["graceful.js"]);
    await waitForOutput(vm, graceful.pid, /ready/);
    await vm.killProcess(graceful.pid); // SIGTERM is the default
    assert.equal(await vm.waitProcess(graceful.pid), 0);
    assert.equal(text(await vm.readFile("/home/agentos/cleaned-up.txt")), "bye");

    // SIGKILL cannot be handled; a numeric signal works too.
    await script("stubborn.js", "process.on('SIGTERM', () => {}); console.log('ready'); setInterval(() => {}, 1000);\n");
    const killed = await vm.spawn("node", ["stubborn.js"]);
    await waitForOutput(vm, killed.pid, /ready/);
    await vm.killProcess(killed.pid, 9);
    assert.equal(await vm.waitProcess(killed.pid), 137);
    const info = (await vm.listProcesses()).find((process) => process.pid === killed.pid);
    assert.equal(info?.signal, "SIGKILL");

    await assertRejects(vm.killProcess(killed.pid, "SIGNOPE"), "INVALID_ARGUMENT", "SIGNOPE");
    // Killing a process that already exited is a no-op.
    await vm.killProcess(killed.pid, "SIGKILL");
  });

  it("listProcesses shows running and exited processes with exit codes", async () => {
    const runner = await vm.spawn("node", ["idle.js"], { env: { ROLE: "runner" } });
    await waitForOutput(vm, runner.pid, /ready/);
    const done = await run(["-e", "process.exit(5)"]);
    const list = (await vm.listProcesses());
    const running = list.find((process) => process.pid === runner.pid);
    const exited = list.find((process) => process.pid === done.pid);
    assert.ok(running && exited, JSON.stringify(list));
    assert.equal(running.running, true);
    assert.equal(running.exitCode, null);
    assert.equal(running.command, "node");
    assert.deepEqual(running.args, ["idle.js"]);
    assert.equal(running.cwd, "/home/agentos");
    assert.equal(exited.running, false);
    assert.equal(exited.exitCode, 5);
    // A copy: changing it does not change the table.
    running.args.push("mutated");
    assert.deepEqual((await vm.listProcesses()).find((process) => process.pid === runner.pid)?.args, ["idle.js"]);

    await vm.killProcess(runner.pid, "SIGKILL");
    await vm.waitProcess(runner.pid);
    const after = (await vm.listProcesses()).find((process) => process.pid === runner.pid);
    assert.equal(after?.running, false);
    assert.equal(after?.exitCode, 137);
  });

  it("listProcesses cuts the command lines of processes the guest started (4 KiB each, 256 KiB in all) and marks them", async () => {
    // The guest starts 80 children with a 100,000-character argument each (MAX_ARG_STRLEN is 128 KiB);
    // each waits on a pipe from the parent, so they end with it.
    const parent = await vm.spawn("node", ["-e", `
      const { spawn } = require("node:child_process");
      const big = "x".repeat(100000);
      for (let i = 0; i < 80; i++) spawn("sh", ["-c", "read line", big + i], { stdio: ["pipe", "ignore", "ignore"] });
      console.log("started");
      setTimeout(() => {}, 60000);
    `]);
    await waitForOutput(vm, parent.pid, /started/);
    try {
      const children = await waitFor(async () => {
        const list = (await vm.listProcesses()).filter((process) => process.ppid === parent.pid && process.command === "sh");
        return list.length === 80 ? list : undefined;
      }, "the guest's 80 children listed");
      const size = (process: { command: string; args: string[] }) => process.command.length + process.args.reduce((sum, arg) => sum + arg.length, 0);
      for (const child of children) {
        assert.equal(child.truncated, true, `pid ${child.pid} is marked as cut`);
        assert.ok(size(child) <= 4096, `pid ${child.pid}: ${size(child)} characters`);
        assert.equal(child.command, "sh");
      }
      assert.ok(children.some((child) => size(child) === 4096), "the first ones keep their full 4 KiB");
      const argChars = children.reduce((sum, child) => sum + size(child) - child.command.length, 0);
      assert.ok(argChars <= 256 * 1024, `the list's args stay within their total: ${argChars}`);
      assert.ok(children.some((child) => child.args.length === 0), "past the total, only the command is left");
      // An API-started process is not cut (its args came through the API), nor marked.
      assert.equal((await vm.listProcesses()).find((process) => process.pid === parent.pid)?.truncated, undefined);
    } finally {
      await vm.killProcess(parent.pid, "SIGKILL");
    }
  });

  it("a program missing from the image is ENOENT naming it and how to add software; node flags are the program's own", async () => {
    await assertRejects(vm.spawn("python", ["-c", "print(1)"]), "ENOENT", "python", /software/);
    await assertRejects(vm.spawn("/usr/local/bin/tool"), "ENOENT", "/usr/local/bin/tool");
    // v1 refused node flags that widened Node's permissions; v2 confines the whole VM, so any flag is the program's business.
    const passed = await run(["-e", "console.log(process.argv.slice(1).join(' '))", "--", "--inspect", "--allow-net"]);
    assert.equal(passed.stdout, "--inspect --allow-net\n", passed.stderr);
    await script("args.js", "console.log(process.argv.slice(2).join(' '));\n");
    const scriptArgs = await run(["args.js", "--inspect", "--allow-net"]);
    assert.equal(scriptArgs.stdout, "--inspect --allow-net\n", scriptArgs.stderr);
  });

  it("programs hold no capability and cannot gain one (no-new-privs), whatever their flags or files", async () => {
    const status = await vm.exec("sh", ["-c", "grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status"]);
    assert.match(status.stdout, /^CapEff:\s+0+$/m, status.stdout);
    assert.match(status.stdout, /^CapPrm:\s+0+$/m, status.stdout);
    assert.match(status.stdout, /^CapBnd:\s+0+$/m, status.stdout);
    assert.match(status.stdout, /^CapAmb:\s+0+$/m, status.stdout);
    assert.match(status.stdout, /^NoNewPrivs:\s+1$/m, status.stdout);
  });

  it("the syscall filter: no setuid or setgid files, no new namespaces, no ptrace; ordinary programs unaffected", async () => {
    const probe = await vm.exec("sh", [
      "-c",
      [
        "grep -E '^Seccomp:' /proc/self/status",
        "touch setid && chmod u+s setid; echo chmod-u+s=$?",
        "chmod g+s setid; echo chmod-g+s=$?",
        "stat -c %a setid",
        "unshare -U true 2>/dev/null; echo unshare=$?",
        "node -e \"try { require('fs').chmodSync('setid', 0o4755); console.log('node-chmod=ok') } catch (e) { console.log('node-chmod=' + e.code) }\"",
        "echo ok | sha256sum | cut -c1-8",
      ].join("; "),
    ]);
    assert.equal(
      probe.stdout,
      ["Seccomp:\t2", "chmod-u+s=1", "chmod-g+s=1", "644", "unshare=1", "node-chmod=EPERM", "dc51b8c9"].join("\n") + "\n",
      probe.stderr,
    );
  });

  it("bad arguments are typed errors", async () => {
    const loose = vm as unknown as { spawn(...args: unknown[]): Promise<unknown> };
    await assertRejects(loose.spawn(42), "INVALID_ARGUMENT", "command");
    await assertRejects(loose.spawn(""), "INVALID_ARGUMENT", "command");
    await assertRejects(loose.spawn("node", "script.js"), "INVALID_ARGUMENT", "args");
    await assertRejects(loose.spawn("node", ["ok.js", 5]), "INVALID_ARGUMENT", "args[1]");
    await assertRejects(loose.spawn("node", ["x.js"], { env: { N: 1 } }), "INVALID_ARGUMENT", "options.env.N");
    await assertRejects(loose.spawn("node", ["x.js"], { env: "FOO=1" }), "INVALID_ARGUMENT", "options.env");
    await assertRejects(loose.spawn("node", ["x.js"], { cwd: 3 }), "INVALID_ARGUMENT", "options.cwd");
    await assertRejects(loose.spawn("node", ["x.js"], { cdw: "/" }), "INVALID_ARGUMENT", "cdw");
    await assertRejects(vm.spawn("node", ["x.js"], { cwd: "/does/not/exist" }), "ENOENT", "/does/not/exist");
    await vm.writeFile("/home/agentos/a-file", "not a directory");
    await assertRejects(vm.spawn("node", ["x.js"], { cwd: "/home/agentos/a-file" }), "ENOTDIR", "a-file");

    await assertRejects(vm.waitProcess(9999), "ESRCH", "9999");
    await assertRejects(vm.killProcess(9999), "ESRCH", "9999");
    await assertRejects(vm.writeProcessStdin(9999, "x"), "ESRCH", "9999");
    assert.throws(() => vm.closeProcessStdin(9999), { code: "ESRCH" });
    await assertRejects((vm as unknown as { waitProcess(pid: unknown): Promise<number> }).waitProcess("1"), "INVALID_ARGUMENT", "pid");
    await assertRejects((vm as unknown as { writeProcessStdin(pid: number, data: unknown): Promise<void> }).writeProcessStdin(1, 42), "INVALID_ARGUMENT", "data");

    // A missing script is the guest's own error, as with a local node.
    const missing = await run(["no-such-script.js"]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /Cannot find module '\/home\/agentos\/no-such-script\.js'/);
  });
});

describe("process logs", () => {
  it("a process's output stays readable after the fact: since, tail, and dropped once past limits.logBytes", async () => {
    const logged = await testVm(dataDir, { name: "logged", limits: { logBytes: 1000 } });
    const early = await logged.exec("sh", ["-c", "echo one; echo two >&2; echo three"]);
    const logs = await logged.getProcessLogs(early.pid);
    assert.equal(logs.dropped, false);
    // The two pipes are read independently, so only each stream's own order is kept.
    const streamText = (stream: string) => logs.output.filter((chunk) => chunk.stream === stream).map((chunk) => Buffer.from(chunk.data).toString()).join("");
    assert.equal(streamText("stdout"), "one\nthree\n");
    assert.equal(streamText("stderr"), "two\n");
    const seqs = logs.output.map((chunk) => chunk.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    const after = await logged.getProcessLogs(early.pid, { since: seqs[0]! });
    assert.equal(after.output.length, logs.output.length - 1);
    const big = await logged.exec("sh", ["-c", "for i in $(seq 300); do echo line-$i; done"]);
    const kept = await logged.getProcessLogs(big.pid);
    assert.equal(kept.dropped, true);
    const text = kept.output.map((chunk) => Buffer.from(chunk.data).toString()).join("");
    assert.ok(text.length <= 1000 && text.endsWith("line-300\n"), text.slice(-40));
    const tail = await logged.getProcessLogs(big.pid, { tail: 20 });
    assert.ok(tail.output.reduce((n, chunk) => n + chunk.data.byteLength, 0) <= 20);
    assert.equal((await logged.listProcesses()).find((info) => info.pid === big.pid)?.logDropped, true);
    await assert.rejects(logged.getProcessLogs(big.pid, { tail: -1 }), { code: "INVALID_ARGUMENT" });
    await assert.rejects(logged.getProcessLogs(424242), { code: "ESRCH" });
  });
});

describe("the VM's init", () => {
  it("init killed from inside the VM ends that VM's processes only; the next spawn starts a new sandbox", async () => {
    const fragile = await testVm(dataDir, { name: "fragile" });
    const bystander = await testVm(dataDir, { name: "bystander" });
    const calm = await bystander.spawn("sleep", ["30"]);
    const sleeper = await fragile.spawn("sleep", ["30"]);
    const before = sandboxProcessTree(fragile.root);
    assert.ok(before.length > 0);
    // Root of the VM's user namespace may signal init; it only ends its own VM.
    // (A moment first, so the spawn's own reply is out before init goes.)
    await fragile.spawn("sh", ["-c", "sleep 0.2; kill -9 2"]);
    assert.equal(await fragile.waitProcess(sleeper.pid), 128 + 9);
    await waitFor(() => sandboxProcessTree(fragile.root).length === 0, "the old sandbox to be gone", 5_000);
    const again = await fragile.exec("sh", ["-c", "echo back"]);
    assert.equal(again.stdout, "back\n");
    assert.ok((await bystander.listProcesses()).some((info) => info.pid === calm.pid && info.running), "another VM's process was touched");
    await bystander.killProcess(calm.pid, "SIGKILL");
  });
});

describe("vm dispose", () => {
  it("ends every guest, and every method then fails with VM_DISPOSED", async () => {
    const doomed = await testVm(dataDir, { name: "doomed" });
    await doomed.writeFile(
      "/home/agentos/server.js",
      "require('http').createServer((req, res) => res.end('alive')).listen(8080, () => console.log('listening'));\n",
    );
    await doomed.writeFile(
      "/home/agentos/beat.js",
      "const fs = require('fs'); let n = 0; setInterval(() => fs.writeFileSync('/tmp/beat', String(++n)), 10); console.log('beating');\n",
    );
    const server = await doomed.spawn("node", ["server.js"]);
    const beat = await doomed.spawn("node", ["--no-warnings", "beat.js"]);
    await waitForOutput(doomed, beat.pid, /beating/);
    const response = await waitForPort(doomed, 8080);
    assert.equal(text(response.body), "alive");
    assert.deepEqual(
      (await doomed.listProcesses()).filter((process) => process.running).map((process) => process.pid).sort(),
      [server.pid, beat.pid].sort(),
    );
    const hostPids = await sandboxProcesses(doomed.root);
    assert.ok(hostPids.length >= 2, `expected the guests' sandbox processes on the host, found ${hostPids.length}`);

    await doomed.dispose();
    assert.equal(doomed.disposed, true);
    await doomed.dispose(); // idempotent

    // The guests are gone: no process of the VM's sandboxes is left on the host…
    await waitFor(async () => (await stillAlive(hostPids)).length === 0, "the VM's processes to end", 5_000);
    // …and the heartbeat file stops changing.
    // Read through the VM made again from the same directory (the VM's disk is mounted only while a Vm holds it).
    const again = await testVm(dataDir, { name: "doomed" });
    const last = text(await again.readFile("/tmp/beat"));
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(text(await again.readFile("/tmp/beat")), last);

    const calls: [string, () => unknown][] = [
      ["writeFile", () => doomed.writeFile("/x", "y")],
      ["readFile", () => doomed.readFile("/home/agentos/server.js")],
      ["mkdir", () => doomed.mkdir("/d")],
      ["readdir", () => doomed.readdir("/")],
      ["stat", () => doomed.stat("/")],
      ["exists", () => doomed.exists("/")],
      ["deleteFile", () => doomed.deleteFile("/home/agentos/server.js")],
      ["remove", () => doomed.remove("/home/agentos/server.js")],
      ["move", () => doomed.move("/a", "/b")],
      ["spawn", () => doomed.spawn("node", ["server.js"])],
      ["waitProcess", () => doomed.waitProcess(server.pid)],
      ["killProcess", () => doomed.killProcess(server.pid)],
      ["writeProcessStdin", () => doomed.writeProcessStdin(server.pid, "x")],
      ["vmFetch", () => doomed.vmFetch(8080, "/")],
      ["vmFetchStream", () => doomed.vmFetchStream(8080, "/")],
      ["listeningPorts", () => doomed.listeningPorts()],
      ["listProcesses", () => doomed.listProcesses()],
    ];
    for (const [name, call] of calls) {
      let result: unknown;
      try {
        result = call();
      } catch (error) {
        assert.fail(`${name} threw synchronously instead of rejecting: ${(error as Error).message}`);
      }
      const error = await rejection(result as Promise<unknown>);
      assert.equal(error.code, "VM_DISPOSED", `${name}: ${error.message}`);
      assert.match(error.message, /doomed/, `${name} should name the VM`);
    }
    for (const [name, call] of [
      ["closeProcessStdin", () => doomed.closeProcessStdin(server.pid)],
    ] as const) {
      assert.throws(call, { code: "VM_DISPOSED" }, name);
    }
    // The files stay on disk: the VM made again from its directory has them.
    assert.match(new TextDecoder().decode(await again.readFile("/home/agentos/server.js")), /createServer/);
  });
});

describe("vm dispose while a spawn is starting", () => {
  it("the spawn fails with VM_DISPOSED and dispose does not hang", async () => {
    // No pool: the guest boots on demand, so dispose lands while it is starting.
    for (const delayMs of [0, 5, 20]) {
      const cold = await testVm(dataDir, { name: `cold-${delayMs}` });
      await cold.writeFile("/home/agentos/idle.js", "setInterval(() => {}, 1000);\n");
      const spawning = cold.spawn("node", ["idle.js"]);
      spawning.catch(() => {});
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      await cold.dispose();
      const outcome = await spawning.then(
        ({ pid }) => ({ pid }),
        (error: { code?: string }) => ({ code: error.code }),
      );
      // Either it started in time (and dispose ended it) or it was refused.
      if ("code" in outcome) assert.equal(outcome.code, "VM_DISPOSED", `delay ${delayMs} ms`);
      else assert.ok(outcome.pid > 0);
      // --die-with-parent ends what is inside the sandbox right after bubblewrap itself.
      await waitFor(async () => (await sandboxProcesses(cold.root)).length === 0, `delay ${delayMs} ms: the sandbox processes to end`, 5_000);
    }
  });
});

function assertNoHostEnv(env: Record<string, string>, allowed: string[]): void {
  assert.equal(env[CANARY], undefined, "a variable of the host process leaked into the guest");
  const extra = Object.keys(env).filter((key) => !GUEST_ENV_KEYS.has(key) && !allowed.includes(key));
  assert.deepEqual(extra, [], `unexpected variables in the guest: ${extra.join(", ")}`);
  assert.notEqual(env.PATH, process.env.PATH, "the host PATH leaked");
  assert.equal(env.HOME, "/home/agentos");
  // The VM's user is root of its own user namespace (never root on the host).
  assert.equal(env.USER, "root");
  assert.ok(!Object.keys(env).some((key) => key.startsWith("AGENTVM_")), `internal variables leaked: ${Object.keys(env)}`);
}

/** Host pids of every process in the VM's sandbox, with their start times. */
async function sandboxProcesses(root: string): Promise<{ pid: number; start: string }[]> {
  const out: { pid: number; start: string }[] = [];
  for (const pid of sandboxProcessTree(root)) {
    const start = await startTime(pid);
    if (start) out.push({ pid, start });
  }
  return out;
}

/** Field 22 of /proc/<pid>/stat, so a reused pid is not mistaken for the same process. */
async function startTime(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => undefined);
  if (!stat) return undefined;
  const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (state[0] === "Z") return undefined; // exited, waiting to be reaped
  return state[19];
}

async function stillAlive(processes: { pid: number; start: string }[]): Promise<number[]> {
  const alive: number[] = [];
  for (const { pid, start } of processes) if ((await startTime(pid)) === start) alive.push(pid);
  return alive;
}
