/**
 * spawn → first HTTP response: the wait a user sees between starting a server
 * in a VM and getting its first answer through vmFetch.
 *
 * Warm: the VM's sandbox (bubblewrap + init) already runs, so a spawn is init
 * starting one more program. Cold: a new VM, whose first spawn starts the
 * sandbox before the program. createVm itself is not timed here (see the VM
 * create row).
 *
 * The guest server stamps its own timeline (program start, listen callback) on
 * the wall clock and returns it in the first response, so each iteration also
 * says where the time went. The "handled" stamp is taken before s.end().
 */
import { spawn } from "node:child_process";
import { mkdtemp, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { join } from "node:path";
import type { Vm } from "agentvm";
import { PINNED_NODE } from "./baseline-server.ts";
import { GUEST_PORT, createBenchVm, firstResponse, stopGuest } from "./guest.ts";
import { freePort, percentile, sleep, wallNow } from "./stats.ts";

/**
 * Tiny server that reports its own milestones as wall-clock ms: when its node
 * process started (performance.timeOrigin), when the program's first line ran,
 * when listen() completed, and when the first request reached the handler.
 */
function timelineServer(port: number): string {
  return `
const wall = () => performance.timeOrigin + performance.now();
const started = wall();
let listening = 0;
require("node:http")
  .createServer((q, s) => s.end(JSON.stringify({ nodeStarted: performance.timeOrigin, started, listening, handled: wall() })))
  .listen(${port}, "127.0.0.1", () => { listening = wall(); });
`;
}

const FILE = "/home/agentos/first.js";

interface GuestTimeline {
  nodeStarted: number;
  started: number;
  listening: number;
  handled: number;
}

/** Milliseconds from the spawn() call to each milestone of one iteration. */
export interface SpawnMilestones {
  spawnReturned: number;
  nodeStarted: number;
  programStarted: number;
  listening: number;
  handled: number;
  firstResponse: number;
}

export interface SpawnSample extends SpawnMilestones {
  attempts: number;
  /** ECONNRESETs met before the first 200. */
  resets: number;
}

export interface SpawnSummary {
  label: "warm" | "cold" | "host";
  iterations: number;
  p50: number;
  p95: number;
  /** p50 of each milestone, ms after the spawn() call. */
  phasesP50: SpawnMilestones;
  iterationsWithReset: number;
}

export interface SpawnOptions {
  dataDir: string;
  iterations: number;
  /** Discarded first iterations (host-side JIT, first file reads). */
  warmupIterations: number;
  log(message: string): void;
}

/** One VM; its first spawn starts the sandbox and is not counted; every later one is warm. */
export async function benchSpawnWarm(options: SpawnOptions): Promise<SpawnSummary> {
  const vm = await createBenchVm(options.dataDir, "bench-spawn-warm");
  try {
    await vm.writeFile(FILE, timelineServer(GUEST_PORT));
    const samples: SpawnSample[] = [];
    // Iteration 0 starts the sandbox (a cold spawn); the warm-up ones follow it.
    for (let i = 0; i < 1 + options.warmupIterations + options.iterations; i++) {
      const sample = await spawnOnce(vm);
      if (i > options.warmupIterations) samples.push(sample);
      // Let the killed server's teardown finish before the next spawn.
      await sleep(20);
    }
    options.log(`spawn → first response, warm: ${samples.length} iterations in one VM`);
    return summarize("warm", samples);
  } finally {
    await vm.dispose();
  }
}

/** A new VM per iteration: the spawn starts its sandbox, then the program. */
export async function benchSpawnCold(options: SpawnOptions): Promise<SpawnSummary> {
  const samples: SpawnSample[] = [];
  for (let i = 0; i < options.warmupIterations + options.iterations; i++) {
    const vm = await createBenchVm(options.dataDir, `bench-spawn-cold-${i}`);
    try {
      await vm.writeFile(FILE, timelineServer(GUEST_PORT));
      const sample = await spawnOnce(vm);
      if (i >= options.warmupIterations) samples.push(sample);
    } finally {
      await vm.dispose();
    }
  }
  options.log(`spawn → first response, cold: ${samples.length} new VMs`);
  return summarize("cold", samples);
}

/**
 * The baseline: the same script run by the pinned Node with child_process.spawn
 * on the host (no sandbox), polled with plain HTTP on 127.0.0.1 every ~1 ms
 * until it answers.
 */
export async function benchSpawnHost(options: SpawnOptions): Promise<SpawnSummary> {
  const dir = await mkdtemp(join(options.dataDir, "spawn-host-"));
  const samples: SpawnSample[] = [];
  for (let i = 0; i < options.warmupIterations + options.iterations; i++) {
    const port = await freePort();
    const file = join(dir, `first-${i}.js`);
    await writeFile(file, timelineServer(port));
    const t0 = wallNow();
    const child = spawn(PINNED_NODE, [file], { stdio: "ignore", cwd: dir });
    const spawnReturned = wallNow();
    try {
      const { body, attempts } = await pollHttp(port, 10_000);
      const done = wallNow();
      const guest = JSON.parse(body) as GuestTimeline;
      if (i >= options.warmupIterations) samples.push({ ...milestonesOf(guest, t0, spawnReturned, done), attempts, resets: 0 });
    } finally {
      await new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once("exit", () => resolve());
        child.kill("SIGKILL");
      });
    }
  }
  options.log(`spawn → first response, host baseline: ${samples.length} spawns`);
  return summarize("host", samples);
}


/** GET / on 127.0.0.1:`port` (fresh connection) until it answers 200; ECONNREFUSED is retried every ~1 ms. */
async function pollHttp(port: number, timeoutMs: number): Promise<{ body: string; attempts: number }> {
  const deadline = Date.now() + timeoutMs;
  for (let attempts = 1; ; attempts++) {
    try {
      const body = await new Promise<string>((resolve, reject) => {
        const req = request({ agent: false, host: "127.0.0.1", port, path: "/" }, (response) => {
          let text = "";
          response.setEncoding("utf8");
          response.on("data", (chunk: string) => (text += chunk));
          response.once("end", () => (response.statusCode === 200 ? resolve(text) : reject(new Error(`status ${response.statusCode}`))));
          response.once("error", reject);
        });
        req.once("error", reject);
        req.end();
      });
      return { body, attempts };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ECONNREFUSED" || Date.now() > deadline) throw error;
      await sleep(1);
    }
  }
}

function milestonesOf(guest: GuestTimeline, t0: number, spawnReturned: number, done: number): SpawnMilestones {
  return {
    spawnReturned: spawnReturned - t0,
    nodeStarted: guest.nodeStarted - t0,
    programStarted: guest.started - t0,
    listening: guest.listening - t0,
    handled: guest.handled - t0,
    firstResponse: done - t0,
  };
}

async function spawnOnce(vm: Vm): Promise<SpawnSample> {
  const t0 = wallNow();
  const { pid } = await vm.spawn("node", ["first.js"]);
  const spawnReturned = wallNow();
  const first = await firstResponse(vm, GUEST_PORT, 10_000);
  const done = wallNow();
  const guest = JSON.parse(Buffer.from(first.body).toString("utf8")) as GuestTimeline;
  await stopGuest(vm, pid);
  return { ...milestonesOf(guest, t0, spawnReturned, done), attempts: first.attempts, resets: first.resets };
}

export const MILESTONES: [keyof SpawnMilestones, string][] = [
  ["spawnReturned", "spawn() resolved"],
  ["nodeStarted", "node started"],
  ["programStarted", "script ran"],
  ["listening", "listening"],
  ["handled", "request handled"],
  ["firstResponse", "first 200"],
];

function summarize(label: SpawnSummary["label"], samples: SpawnSample[]): SpawnSummary {
  const totals = samples.map((sample) => sample.firstResponse);
  const phasesP50 = Object.fromEntries(MILESTONES.map(([key]) => [key, percentile(samples.map((sample) => sample[key]), 50)])) as unknown as SpawnMilestones;
  return {
    label,
    iterations: samples.length,
    p50: percentile(totals, 50),
    p95: percentile(totals, 95),
    phasesP50,
    iterationsWithReset: samples.filter((sample) => sample.resets > 0).length,
  };
}
