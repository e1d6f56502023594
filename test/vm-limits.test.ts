/**
 * End to end: resource limits. A guest that misbehaves (unbounded memory, a
 * busy loop, too many processes) is stopped or refused, and other VMs keep
 * working. Real guests in the real sandbox.
 */
import { afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createVm, type Vm } from "agentvm";
import { collectOutput, rejection, tempDataDir, testVm, text, waitFor, waitForOutput, waitForPort } from "./helpers.ts";

const dataDir = await tempDataDir("agentvm-limits-");
/** A well-behaved neighbour: its HTTP server must keep answering throughout. */
const neighbour = await testVm(dataDir, { name: "neighbour" });
const NEIGHBOUR_PORT = 3000;

async function neighbourAnswers(label: string): Promise<void> {
  const response = await neighbour.vmFetch(NEIGHBOUR_PORT, `/ping?during=${label}`);
  assert.equal(response.status, 200);
  assert.equal(text(response.body), `pong /ping?during=${label}`);
}

before(async () => {
  await neighbour.writeFile(
    "/home/agentos/server.js",
    "require('http').createServer((req, res) => res.end('pong ' + req.url)).listen(3000);\n",
  );
  await neighbour.spawn("node", ["server.js"]);
  await waitForPort(neighbour, NEIGHBOUR_PORT);
});

describe("limits.memoryMb", () => {
  let vm: Vm;
  before(async () => {
    vm = await testVm(dataDir, { name: "hungry", limits: { memoryMb: 64 } });
  });

  it("a guest that allocates JS objects without bound dies, and other VMs keep answering", async () => {
    await vm.writeFile(
      "/home/agentos/heap.js",
      "const keep = []; console.log('allocating');\n" +
        "setInterval(() => { for (let i = 0; i < 20; i++) keep.push(new Array(100_000).fill({ n: keep.length })); }, 1);\n",
    );
    const { pid } = await vm.spawn("node", ["heap.js"]);
    const output = collectOutput(vm, pid);
    try {
      await waitForOutput(vm, pid, /allocating/);
      await neighbourAnswers("heap");
      const code = await vm.waitProcess(pid);
      assert.notEqual(code, 0, `the guest should have died, output: ${output.all}`);
      assert.match(output.stderr, /heap limit|out of memory/i);
    } finally {
      output.stop();
    }
    await neighbourAnswers("after-heap");
  });

  it("a guest that allocates memory outside the JS heap without bound dies too", async () => {
    // Buffers live outside V8's heap: the OS limit (RLIMIT_DATA) stops them.
    await vm.writeFile(
      "/home/agentos/buffers.js",
      "const keep = []; console.log('allocating');\n" +
        "setInterval(() => { keep.push(Buffer.alloc(16 * 1024 * 1024, 1)); }, 1);\n",
    );
    const { pid } = await vm.spawn("node", ["buffers.js"]);
    const output = collectOutput(vm, pid);
    try {
      await waitForOutput(vm, pid, /allocating/);
      await neighbourAnswers("buffers");
      const code = await vm.waitProcess(pid);
      assert.notEqual(code, 0, `the guest should have died, output: ${output.all}`);
    } finally {
      output.stop();
    }
    await neighbourAnswers("after-buffers");
    // The VM still runs programs afterwards.
    const ok = await vm.spawn("node", ["-e", "console.log('still fine')"]);
    assert.equal(await vm.waitProcess(ok.pid), 0);
  });
});

describe("the smallest memoryMb", () => {
  it("still runs programs, TypeScript and WebAssembly included", async () => {
    const small = await testVm(dataDir, { name: "small", limits: { memoryMb: 32 } });
    // Type stripping and fetch's HTTP parser load WebAssembly, which needs address space of its own.
    await small.writeFile(
      "/home/agentos/app.ts",
      "const n: number = 40;\nconst wasm = await WebAssembly.instantiate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]));\n" +
        "const buffer: Buffer = Buffer.alloc(8 * 1024 * 1024, 1);\nconsole.log('ts', n + 2, typeof wasm.instance, buffer.length);\n",
    );
    const { pid } = await small.spawn("node", ["app.ts"]);
    const output = collectOutput(small, pid);
    try {
      assert.equal(await small.waitProcess(pid), 0, output.all);
      await waitFor(() => output.stdout.includes("\n"), "the program's output");
      assert.equal(output.stdout, "ts 42 object 8388608\n");
    } finally {
      output.stop();
      await small.dispose();
    }
  });
});

describe("busy guests", () => {
  let vm: Vm;
  before(async () => {
    vm = await testVm(dataDir, { name: "busy" });
    await vm.writeFile("/home/agentos/spin.js", "console.log('spinning'); while (true) {}\n");
    await vm.writeFile(
      "/home/agentos/spin-handler.js",
      // The handler can never run: the loop never yields. SIGKILL still ends it.
      "process.on('SIGTERM', () => { console.log('never'); process.exit(0); }); console.log('spinning'); while (true) {}\n",
    );
  });

  for (const signal of ["SIGKILL", "SIGTERM"] as const) {
    it(`a guest in while(true){} ends with ${signal} while another VM keeps answering`, async () => {
      const { pid } = await vm.spawn("node", ["spin.js"]);
      await waitForOutput(vm, pid, /spinning/);
      await neighbourAnswers(`spin-${signal}`);
      assert.equal((await vm.listProcesses()).find((process) => process.pid === pid)?.running, true);
      await vm.killProcess(pid, signal);
      assert.equal(await vm.waitProcess(pid), signal === "SIGKILL" ? 137 : 143);
      const info = (await vm.listProcesses()).find((process) => process.pid === pid);
      assert.equal(info?.running, false);
      assert.equal(info?.signal, signal);
      await neighbourAnswers(`after-spin-${signal}`);
    });
  }

  it("a busy guest whose SIGTERM handler cannot run still ends with SIGKILL", async () => {
    const { pid } = await vm.spawn("node", ["spin-handler.js"]);
    const output = collectOutput(vm, pid);
    try {
      await waitForOutput(vm, pid, /spinning/);
      await vm.killProcess(pid, "SIGTERM");
      // Still running: the handler is queued behind the loop.
      await neighbourAnswers("spin-handler");
      assert.equal((await vm.listProcesses()).find((process) => process.pid === pid)?.running, true);
      await vm.killProcess(pid, "SIGKILL");
      assert.equal(await vm.waitProcess(pid), 137);
      assert.doesNotMatch(output.stdout, /never/);
    } finally {
      output.stop();
    }
  });
});

describe("limits.maxProcesses", () => {
  let vm: Vm;
  afterEach(async () => {
    // A failed test must not leave processes that make the next one fail too.
    const running = (await vm.listProcesses()).filter((process) => process.running);
    await Promise.all(running.map((process) => vm.killProcess(process.pid, "SIGKILL")));
    await Promise.all(running.map((process) => vm.waitProcess(process.pid)));
  });
  before(async () => {
    vm = await testVm(dataDir, { name: "capped", limits: { maxProcesses: 2 } });
    await vm.writeFile("/home/agentos/wait.js", "console.log('up'); process.stdin.resume(); process.stdin.on('end', () => process.exit(0));\n");
  });

  it("the third concurrent process fails with EAGAIN naming limits.maxProcesses", async () => {
    const first = await vm.spawn("node", ["wait.js"]);
    const firstOutput = collectOutput(vm, first.pid);
    const second = await vm.spawn("node", ["--no-warnings", "wait.js"]);
    const secondOutput = collectOutput(vm, second.pid);
    await waitFor(() => firstOutput.stdout.includes("up") && secondOutput.stdout.includes("up"), "both processes to start");
    firstOutput.stop();
    secondOutput.stop();

    const error = await rejection(vm.spawn("node", ["-e", "console.log('third')"]));
    assert.equal(error.code, "EAGAIN", error.message);
    assert.match(error.message, /limits\.maxProcesses/);
    assert.match(error.message, /\b2\b/);
    // A refused spawn takes no pid and leaves no entry behind.
    assert.equal((await vm.listProcesses()).length, 2);

    // When one exits, there is room again.
    vm.closeProcessStdin(first.pid);
    assert.equal(await vm.waitProcess(first.pid), 0);
    const third = await vm.spawn("node", ["-e", "console.log('third')"]);
    assert.equal(await vm.waitProcess(third.pid), 0);
    vm.closeProcessStdin(second.pid);
    assert.equal(await vm.waitProcess(second.pid), 0);
    // Exited processes do not count: two at once again.
    const a = await vm.spawn("node", ["wait.js"]);
    const b = await vm.spawn("node", ["wait.js"]);
    await waitFor(async () => (await vm.listProcesses()).filter((process) => process.running).length === 2, "two running processes");
    for (const { pid } of [a, b]) vm.closeProcessStdin(pid);
    for (const { pid } of [a, b]) assert.equal(await vm.waitProcess(pid), 0);
  });

  it("concurrent spawns racing for the last slot do not exceed the cap", async () => {
    const results = await Promise.allSettled([0, 1, 2, 3].map(() => vm.spawn("node", ["wait.js"])));
    const started = results.flatMap((result) => (result.status === "fulfilled" ? [result.value.pid] : []));
    const refused = results.flatMap((result) => (result.status === "rejected" ? [(result.reason as { code?: string }).code] : []));
    try {
      assert.equal(started.length, 2, `started ${started.length}: ${JSON.stringify(refused)}`);
      assert.deepEqual(refused, ["EAGAIN", "EAGAIN"]);
      assert.equal((await vm.listProcesses()).filter((process) => process.running).length, 2);
    } finally {
      for (const pid of started) vm.closeProcessStdin(pid);
      for (const pid of started) await vm.waitProcess(pid);
    }
  });
});

/** Per-VM control groups exist where the server may write cgroup v1 memory, pids and cpu (a root server; CI runs as root). */
const noCgroups = await (async () => {
  const probe = await testVm(dataDir, { name: "cgroup-probe" });
  return (await probe.usage()).caps ? false : "this host gives the server no writable cgroup v1 memory, pids and cpu controllers";
})();

describe("per-VM caps: all of a VM's processes together", { skip: noCgroups }, () => {
  it("totalMemoryMb: a process past the VM's memory is killed, the VM and its neighbour keep working, usage() says so", async () => {
    const small = await testVm(dataDir, { name: "small-total", limits: { totalMemoryMb: 128 } });
    const hog = await small.exec("node", ["-e", "const held = []; for (;;) held.push(Buffer.alloc(16 << 20, 1));"]);
    assert.equal(hog.exitCode, 128 + 9, hog.stderr);
    const used = await small.usage();
    assert.equal(used.caps, true);
    assert.ok(used.memoryPeakBytes! <= 128 * 1024 * 1024 && used.memoryPeakBytes! > 100 * 1024 * 1024, `peak ${used.memoryPeakBytes}`);
    assert.ok(used.oomKills! >= 1, JSON.stringify(used));
    assert.equal((await small.exec("echo", ["still here"])).stdout, "still here\n");
    await neighbourAnswers("total-memory");
  });

  it("tmpfs counts: filling /dev/shm cannot take more than the VM's memory", async () => {
    const shm = await testVm(dataDir, { name: "shm-total", limits: { totalMemoryMb: 96 } });
    // The kernel kills a process of the VM (possibly its init, which ends that sandbox); the host keeps its memory.
    const filled = await shm.exec("sh", ["-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=512 2>/dev/null; ls -l /dev/shm/fill"]).catch((error: { code?: string }) => error);
    if ("exitCode" in filled) {
      const size = Number(/\s(\d+)\s+\w+\s+\d+\s+[\d:]+\s+\/dev\/shm\/fill/.exec(filled.stdout)?.[1] ?? 0);
      assert.ok(filled.exitCode !== 0 || size <= 96 * 1024 * 1024, `wrote ${size} bytes: ${filled.stdout} ${filled.stderr}`);
    } else {
      assert.equal(filled.code, "SANDBOX_EXITED");
    }
    assert.equal((await shm.exec("echo", ["after"])).stdout, "after\n");
    await neighbourAnswers("shm");
  });

  it("maxTasks: processes and threads a VM's programs start themselves are capped too", async () => {
    const few = await testVm(dataDir, { name: "few-tasks", limits: { maxTasks: 48 } });
    const forked = await few.exec("sh", ["-c", "for i in $(seq 100); do sleep 2 & done; wait; echo done"]);
    assert.match(forked.stderr, /fork/i);
    assert.ok((await few.usage()).tasks! <= 48);
    await neighbourAnswers("tasks");
  });
});

describe("limits validation", () => {
  const cases: [string, unknown, RegExp][] = [
    ["memoryMb as a string", { memoryMb: "x" }, /limits\.memoryMb/],
    ["negative memoryMb", { memoryMb: -64 }, /limits\.memoryMb/],
    ["fractional memoryMb", { memoryMb: 64.5 }, /limits\.memoryMb/],
    ["memoryMb below what Node needs", { memoryMb: 8 }, /limits\.memoryMb/],
    ["NaN memoryMb", { memoryMb: Number.NaN }, /limits\.memoryMb/],
    ["zero maxProcesses", { maxProcesses: 0 }, /limits\.maxProcesses/],
    ["negative maxProcesses", { maxProcesses: -1 }, /limits\.maxProcesses/],
    ["Infinity maxProcesses", { maxProcesses: Number.POSITIVE_INFINITY }, /limits\.maxProcesses/],
    ["negative poolSize", { poolSize: -1 }, /limits\.poolSize/],
    ["an unknown key", { memoryMB: 64 }, /limits\.memoryMB/],
    ["limits that are not an object", 64, /limits/],
  ];
  for (const [label, limits, mentions] of cases) {
    it(`rejects ${label} with INVALID_ARGUMENT at createVm`, async () => {
      const error = await rejection(createVm({ dataDir, name: "invalid", limits: limits as never }));
      assert.equal(error.code, "INVALID_ARGUMENT", error.message);
      assert.match(error.message, mentions);
    });
  }
});
