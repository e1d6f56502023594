/**
 * VM-side helpers shared by the benchmarks: a scratch data directory, VM
 * creation, and starting a guest HTTP server and waiting until it answers.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AgentVmError, createVm, type Vm, type VmLimits } from "agentvm";
import { sleep } from "./stats.ts";

export const GUEST_PORT = 3000;

/** The guest server every throughput and memory benchmark runs: the brief's one-liner. */
export const OK_SERVER = `require("node:http").createServer((q, s) => s.end("ok")).listen(${GUEST_PORT});\n`;

/** VM files live here for the run and are removed at the end. */
export async function makeDataDir(): Promise<{ path: string; remove(): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), "agentvm-bench-"));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

export async function createBenchVm(dataDir: string, name: string, limits?: VmLimits): Promise<Vm> {
  return createVm({ dataDir, name, ...(limits ? { limits } : {}) });
}

/** Writes `source` as /home/agentos/<file>, spawns `node <file>`, and resolves once it answers 200. */
export async function startGuestServer(vm: Vm, file: string, source: string): Promise<number> {
  await vm.writeFile(`/home/agentos/${file}`, source);
  const { pid } = await vm.spawn("node", [file]);
  await firstResponse(vm, GUEST_PORT, 10_000);
  return pid;
}

/** Across the run: how many first responses were awaited, and how many met at least one ECONNRESET. */
export const firstResponseStats = { waits: 0, withReset: 0 };

export interface FirstResponse {
  body: Uint8Array;
  attempts: number;
  resets: number;
}

/**
 * vmFetch `/` until it answers, retrying every ~1 ms while nothing listens yet
 * (ECONNREFUSED) — how a user waits for a freshly spawned server. (vmFetch
 * itself already waits out a start-up grace after a spawn, so the first call
 * usually answers.)
 *
 * ECONNRESET is retried too but counted: a server that accepts before its
 * handler is ready resets, and the report says how often that happened. Any
 * other error is thrown.
 */
export async function firstResponse(vm: Vm, port: number, timeoutMs: number): Promise<FirstResponse> {
  const deadline = Date.now() + timeoutMs;
  let resets = 0;
  for (let attempts = 1; ; attempts++) {
    try {
      const response = await vm.vmFetch(port, "/");
      if (response.status !== 200) throw new Error(`guest server answered ${response.status}`);
      firstResponseStats.waits++;
      if (resets > 0) firstResponseStats.withReset++;
      return { body: response.body, attempts, resets };
    } catch (error) {
      const code = error instanceof AgentVmError ? error.code : undefined;
      if (code !== "ECONNREFUSED" && code !== "ECONNRESET") throw error;
      if (code === "ECONNRESET") resets++;
      if (Date.now() > deadline) throw new Error(`no answer on port ${port} in VM ${vm.name} after ${timeoutMs} ms`, { cause: error });
      await sleep(1);
    }
  }
}

/** Kills a guest process and waits until the VM has reaped it (its port is free again). */
export async function stopGuest(vm: Vm, pid: number): Promise<void> {
  await vm.killProcess(pid, "SIGKILL");
  await vm.waitProcess(pid);
}
