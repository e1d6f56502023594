/**
 * The server as a client sees it: action round trips over HTTP, creating a VM
 * with its first action, and what idle VMs cost the server process.
 *
 * Every agentvm server here runs in its own child process (server-process.ts),
 * so its RSS comes from /proc/<pid>/status and the sandboxes it started are its
 * direct bwrap children; this process is only the client. The baseline is a
 * plain Node HTTP server in another child on 127.0.0.1 doing the same file work
 * with node:fs, called with the same fetch and JSON bodies the client sends.
 */
import { join } from "node:path";
import { createClient, type VmHandle } from "agentvm/client";
import { startNodeServer, type BaselineServer } from "./baseline-server.ts";
import { startServerProcess, type BenchRegistry, type ServerProcess } from "./server-process.ts";
import { now, percentile, sampleEvery, sleep } from "./stats.ts";

export interface Latency {
  p50: number;
  p95: number;
  samples: number;
}

export interface LatencyPair {
  vm: Latency;
  baseline: Latency;
}

export interface IdleVmsResult {
  poolSize: number;
  vms: number;
  rssBeforeMb: number;
  rssAfterMb: number;
  /** Server RSS growth per VM, KiB. */
  perVmKb: number;
  /** Guest sandboxes the server runs after creating the VMs (none spawned a process). */
  sandboxes: number;
  /** Private MiB over all those sandboxes' processes. */
  sandboxPrivateMb: number;
  createSeconds: number;
}

export interface PooledVmsResult {
  vms: number;
  poolIdleMs: number;
  execP50Ms: number;
  rssBeforeMb: number;
  /** Highest server RSS sampled (every 100 ms) from the first exec until the pools drained. */
  rssPeakMb: number;
  rssAfterDrainMb: number;
  /** Most pooled guests (ready or booting) alive at once, sampled every 100 ms. */
  peakPooledGuests: number;
  /** Their private MiB at that moment. */
  peakPooledPrivateMb: number;
  sandboxesAfterDrain: number;
  /** From the last exec's return until no sandbox was left; NaN if it never drained. */
  drainedAfterMs: number;
}

export interface CreateResult extends LatencyPair {
  vms: number;
  /** Sandboxes found for the new keys' VM directories after they were created (none spawned anything). */
  sandboxesForKeys: number;
  /** The same creation on a server whose VMs have poolSize 0: no guest can be launched by it. */
  vmPool0: Latency;
}

export interface ServerActionsResult {
  writeFile: LatencyPair;
  exists: LatencyPair;
  create: CreateResult;
  /** Default definition (poolSize 1). */
  idle: IdleVmsResult;
  /** The same with poolSize 0: what an idle VM costs when no guest is started for it. */
  idlePool0: IdleVmsResult;
  pooled: PooledVmsResult;
}

export interface ServerActionsOptions {
  dataDir: string;
  roundTrip: { warmupCalls: number; calls: number; rounds: number };
  createVms: number;
  idleVms: number;
  pooledVms: number;
  poolIdleMs: number;
  log(message: string): void;
}

const CONTENT = "x".repeat(100);
const FILE = "/home/agentos/round-trip.txt";
const MB = 1024;

/** The baseline: the same three operations as plain node:fs behind a plain HTTP server. */
function baselineSource(root: string): string {
  return `
const http = require("node:http");
const fs = require("node:fs/promises");
const path = require("node:path");
const root = ${JSON.stringify(root)};
const home = path.join(root, "home");
const server = http.createServer(async (q, s) => {
  const chunks = [];
  for await (const chunk of q) chunks.push(chunk);
  const args = JSON.parse(Buffer.concat(chunks).toString("utf8")).value;
  let result = null;
  if (q.url === "/writeFile") await fs.writeFile(path.join(home, path.basename(args[0])), args[1]);
  else if (q.url === "/exists") result = await fs.access(path.join(home, path.basename(args[0]))).then(() => true, () => false);
  else {
    const dir = path.join(root, "vms", path.basename(q.url), "home");
    await fs.mkdir(dir, { recursive: true });
    await fs.writeFile(path.join(dir, path.basename(args[0])), args[1]);
  }
  const body = JSON.stringify({ value: result });
  s.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) }).end(body);
});
require("node:fs").mkdirSync(home, { recursive: true });
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
`;
}

type Call = () => Promise<unknown>;

function baselineCaller(server: BaselineServer, route: string, args: unknown[]): Call {
  const url = `http://127.0.0.1:${server.port}/${route}`;
  const body = JSON.stringify({ value: args });
  return async () => {
    const response = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body });
    return (JSON.parse(await response.text()) as { value: unknown }).value;
  };
}

export async function benchServerActions(options: ServerActionsOptions): Promise<ServerActionsResult> {
  const baseline = await startNodeServer(baselineSource(join(options.dataDir, "baseline-actions")));
  try {
    const { writeFile, exists, create } = await roundTripsAndCreate(options, baseline);
    const idle = await idleVms(options, 1);
    const idlePool0 = await idleVms(options, 0);
    const pooled = await pooledVms(options);
    return { writeFile, exists, create, idle, idlePool0, pooled };
  } finally {
    await baseline.stop();
  }
}

/** Loopback by address, as the baseline is: the server listens on 127.0.0.1 for "localhost". */
function clientFor(server: ServerProcess) {
  return createClient<BenchRegistry>(`http://127.0.0.1:${server.port}`);
}

async function roundTripsAndCreate(options: ServerActionsOptions, baseline: BaselineServer) {
  const server = await startServerProcess(join(options.dataDir, "server-actions"));
  try {
    const client = clientFor(server);
    const vm = client.vm.getOrCreate("bench-round-trip");
    const { warmupCalls, calls, rounds } = options.roundTrip;
    options.log(`server actions: ${calls} sequential writeFile and exists calls per side, ${rounds} alternating rounds`);
    const writeFile = await compareCalls(baselineCaller(baseline, "writeFile", [FILE, CONTENT]), () => vm.writeFile(FILE, CONTENT), warmupCalls, calls, rounds);
    const existsResult = await vm.exists(FILE);
    if (existsResult !== true) throw new Error(`exists(${FILE}) answered ${String(existsResult)} after writeFile`);
    const exists = await compareCalls(baselineCaller(baseline, "exists", [FILE]), () => vm.exists(FILE), warmupCalls, calls, rounds);

    options.log(`server actions: create ${options.createVms} VMs (getOrCreate(new key).writeFile)`);
    // Let the round-trip VM's own start-up settle before counting sandboxes.
    await sleep(500);
    const sandboxesBefore = server.sandboxes().length;
    const baselineCreate: number[] = [];
    for (let i = 0; i < options.createVms; i++) baselineCreate.push(await timed(baselineCaller(baseline, `create/bench-create-${i}`, [FILE, CONTENT])));
    const keys = Array.from({ length: options.createVms }, (_, i) => `bench-create-${i}`);
    const vmCreate = await createVms(client, keys);
    // A guest launched for a key would be bwrap within a few ms; give it ample time to show.
    await sleep(500);
    const sandboxesForKeys = server.sandboxesOf(keys).length;
    const sandboxesAfter = server.sandboxes().length;
    options.log(`server actions: ${sandboxesForKeys} sandboxes belong to the ${keys.length} new VMs (server total ${sandboxesBefore} → ${sandboxesAfter})`);
    const vmPool0 = await createWithoutPool(options, keys);
    return {
      writeFile,
      exists,
      create: { vm: summarize(vmCreate), baseline: summarize(baselineCreate), vms: keys.length, sandboxesForKeys, vmPool0 },
    };
  } finally {
    await server.stop();
  }
}

async function createVms(client: ReturnType<typeof clientFor>, keys: readonly string[]): Promise<number[]> {
  const latencies: number[] = [];
  for (const key of keys) latencies.push(await timed(() => client.vm.getOrCreate(key).writeFile(FILE, CONTENT)));
  return latencies;
}

/** Creation alone, without a guest launch on its path: the same keys on a server whose VMs have poolSize 0. */
async function createWithoutPool(options: ServerActionsOptions, keys: readonly string[]): Promise<Latency> {
  const server = await startServerProcess(join(options.dataDir, "server-create-pool0"), { limits: { poolSize: 0 } });
  try {
    const client = clientFor(server);
    await warmVm(client.vm.getOrCreate("bench-create-warmup"));
    options.log(`server actions: create ${keys.length} VMs on a poolSize 0 server`);
    return summarize(await createVms(client, keys));
  } finally {
    await server.stop();
  }
}

/** Warm-up on both sides, then `calls` per side in `rounds` alternating slices (shared noise). */
async function compareCalls(direct: Call, viaVm: Call, warmupCalls: number, calls: number, rounds: number): Promise<LatencyPair> {
  for (let i = 0; i < warmupCalls; i++) await direct();
  for (let i = 0; i < warmupCalls; i++) await viaVm();
  const vm: number[] = [];
  const base: number[] = [];
  const perRound = Math.ceil(calls / rounds);
  for (let round = 0; round < rounds; round++) {
    for (let i = 0; i < perRound; i++) base.push(await timed(direct));
    for (let i = 0; i < perRound; i++) vm.push(await timed(viaVm));
  }
  return { vm: summarize(vm), baseline: summarize(base) };
}

async function idleVms(options: ServerActionsOptions, poolSize: 0 | 1): Promise<IdleVmsResult> {
  const config = poolSize === 1 ? {} : { limits: { poolSize } };
  const server = await startServerProcess(join(options.dataDir, `server-idle-pool${poolSize}`), config);
  try {
    const client = clientFor(server);
    // Warm the server's code paths (actor, SQLite, directory layout) with one throwaway VM.
    await warmVm(client.vm.getOrCreate("bench-idle-warmup"));
    await settleSandboxes(server);
    const rssBefore = server.rssKb();
    options.log(`idle VMs${poolSize === 0 ? ", poolSize 0" : ""}: creating ${options.idleVms} VMs, one writeFile each`);
    const started = now();
    for (let i = 0; i < options.idleVms; i++) await client.vm.getOrCreate(`bench-idle-${i}`).writeFile(FILE, CONTENT);
    const createSeconds = (now() - started) / 1000;
    await sleep(500);
    await settleSandboxes(server);
    const rssAfter = server.rssKb();
    const memory = server.sandboxMemory();
    const keys = Array.from({ length: options.idleVms }, (_, i) => `bench-idle-${i}`);
    const sandboxes = server.sandboxesOf(keys).length;
    options.log(`idle VMs, poolSize ${poolSize}: server RSS ${(rssBefore / MB).toFixed(1)} → ${(rssAfter / MB).toFixed(1)} MB, ${sandboxes} sandboxes for the new VMs`);
    return {
      poolSize,
      vms: options.idleVms,
      rssBeforeMb: rssBefore / MB,
      rssAfterMb: rssAfter / MB,
      perVmKb: (rssAfter - rssBefore) / options.idleVms,
      sandboxes,
      sandboxPrivateMb: memory.privateKb / MB,
      createSeconds,
    };
  } finally {
    await server.stop();
  }
}

async function pooledVms(options: ServerActionsOptions): Promise<PooledVmsResult> {
  const server = await startServerProcess(join(options.dataDir, "server-pooled"), { limits: { poolIdleMs: options.poolIdleMs } });
  try {
    const client = clientFor(server);
    const warm = client.vm.getOrCreate("bench-pooled-warmup");
    await warmVm(warm);
    await execZero(warm);
    await waitForNoSandboxes(server, options.poolIdleMs + 10_000);
    await sleep(300);
    const rssBefore = server.rssKb();
    options.log(`pooled VMs: ${options.pooledVms} VMs each exec node -e 0 (poolIdleMs ${options.poolIdleMs})`);
    // Pool guests fill and drain on their own clocks, so watch them throughout instead of reading once.
    const sampler = sampleEvery(100, () => {
      const pooled = server.sandboxMemory(true);
      return { serverRssKb: server.rssKb(), sandboxes: pooled.sandboxes, privateKb: pooled.privateKb };
    });
    const execs: number[] = [];
    for (let i = 0; i < options.pooledVms; i++) execs.push(await timed(() => execZero(client.vm.getOrCreate(`bench-pooled-${i}`))));
    const lastExec = now();
    const drainedAt = await waitForNoSandboxes(server, options.poolIdleMs + 10_000);
    const samples = sampler.stop();
    await sleep(300);
    const rssAfterDrain = server.rssKb();
    const peak = samples.reduce((best, sample) => (sample.sandboxes > best.sandboxes ? sample : best));
    const sandboxesAfterDrain = server.sandboxes().length;
    options.log(`pooled VMs: at most ${peak.sandboxes} pooled guests at once, ${sandboxesAfterDrain} sandboxes after the drain`);
    return {
      vms: options.pooledVms,
      poolIdleMs: options.poolIdleMs,
      execP50Ms: percentile(execs, 50),
      rssBeforeMb: rssBefore / MB,
      rssPeakMb: Math.max(...samples.map((sample) => sample.serverRssKb)) / MB,
      rssAfterDrainMb: rssAfterDrain / MB,
      peakPooledGuests: peak.sandboxes,
      peakPooledPrivateMb: peak.privateKb / MB,
      sandboxesAfterDrain,
      drainedAfterMs: drainedAt - lastExec,
    };
  } finally {
    await server.stop();
  }
}

async function warmVm(vm: VmHandle): Promise<void> {
  for (let i = 0; i < 20; i++) {
    await vm.writeFile(FILE, CONTENT);
    await vm.exists(FILE);
  }
}

async function execZero(vm: VmHandle): Promise<void> {
  const result = await vm.exec("node", ["-e", "0"]);
  if (result.exitCode !== 0) throw new Error(`node -e 0 exited with ${result.exitCode}: ${result.stderr}`);
}

/**
 * Waits until the guests the server started have booted: their summed memory
 * stops growing (two readings 500 ms apart within 2 %), at most 60 s. Returns
 * at once when there are none.
 */
async function settleSandboxes(server: ServerProcess): Promise<void> {
  const deadline = now() + 60_000;
  let last = server.sandboxMemory();
  while (last.sandboxes > 0 && now() < deadline) {
    await sleep(500);
    const next = server.sandboxMemory();
    const stable = next.sandboxes === last.sandboxes && Math.abs(next.privateKb - last.privateKb) <= 0.02 * last.privateKb;
    last = next;
    if (stable) return;
  }
}

/** Polls every 100 ms until the server runs no sandbox; returns when (now()), NaN on timeout. */
async function waitForNoSandboxes(server: ServerProcess, timeoutMs: number): Promise<number> {
  const deadline = now() + timeoutMs;
  while (now() < deadline) {
    if (server.sandboxes().length === 0) return now();
    await sleep(100);
  }
  return Number.NaN;
}

async function timed(call: Call): Promise<number> {
  const start = now();
  await call();
  return now() - start;
}

function summarize(samples: number[]): Latency {
  return { p50: percentile(samples, 50), p95: percentile(samples, 95), samples: samples.length };
}
