/**
 * The server as a client sees it: action round trips over HTTP, creating a VM
 * with its first action, and what idle VMs cost the server process.
 *
 * Every agentvm server here runs in its own child process (server-process.ts),
 * so its RSS comes from /proc/<pid>/status and the sandboxes it started are its
 * direct bwrap children — none is expected, as no VM here runs a program. This
 * process is only the client. The baseline is a plain Node HTTP server in
 * another child on 127.0.0.1 doing the same file work with node:fs, called
 * with the same fetch and JSON bodies the client sends.
 */
import { join } from "node:path";
import { createClient, type VmHandle } from "agentvm/client";
import { startNodeServer, type BaselineServer } from "./baseline-server.ts";
import { startServerProcess, type BenchRegistry, type ServerProcess } from "./server-process.ts";
import { now, percentile, sleep } from "./stats.ts";

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
  vms: number;
  rssBeforeMb: number;
  rssAfterMb: number;
  /** Server RSS growth per VM, KiB. */
  perVmKb: number;
  /** Sandboxes the server runs after creating the VMs (none spawned a process, so any is a bug). */
  sandboxes: number;
  /** Private MiB over all those sandboxes' processes. */
  sandboxPrivateMb: number;
  createSeconds: number;
}

export interface CreateResult extends LatencyPair {
  vms: number;
  /** Sandboxes the server runs after they were created (no VM spawned anything). */
  sandboxes: number;
}

export interface ServerActionsResult {
  writeFile: LatencyPair;
  exists: LatencyPair;
  create: CreateResult;
  idle: IdleVmsResult;
}

export interface ServerActionsOptions {
  dataDir: string;
  roundTrip: { warmupCalls: number; calls: number; rounds: number };
  createVms: number;
  idleVms: number;
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
    const idle = await idleVms(options);
    return { writeFile, exists, create, idle };
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
    const baselineCreate: number[] = [];
    for (let i = 0; i < options.createVms; i++) baselineCreate.push(await timed(baselineCaller(baseline, `create/bench-create-${i}`, [FILE, CONTENT])));
    const keys = Array.from({ length: options.createVms }, (_, i) => `bench-create-${i}`);
    const vmCreate = await createVms(client, keys);
    // A sandbox started for a VM would be bwrap within a few ms; give it ample time to show.
    await sleep(500);
    const sandboxes = server.sandboxes().length;
    options.log(`server actions: the server runs ${sandboxes} sandboxes after creating ${keys.length} VMs`);
    return {
      writeFile,
      exists,
      create: { vm: summarize(vmCreate), baseline: summarize(baselineCreate), vms: keys.length, sandboxes },
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

async function idleVms(options: ServerActionsOptions): Promise<IdleVmsResult> {
  const server = await startServerProcess(join(options.dataDir, "server-idle"));
  try {
    const client = clientFor(server);
    // Warm the server's code paths (actor, SQLite, directory layout) with one throwaway VM.
    await warmVm(client.vm.getOrCreate("bench-idle-warmup"));
    await sleep(300);
    const rssBefore = server.rssKb();
    options.log(`idle VMs: creating ${options.idleVms} VMs, one writeFile each`);
    const started = now();
    for (let i = 0; i < options.idleVms; i++) await client.vm.getOrCreate(`bench-idle-${i}`).writeFile(FILE, CONTENT);
    const createSeconds = (now() - started) / 1000;
    await sleep(500);
    const rssAfter = server.rssKb();
    const memory = server.sandboxMemory();
    options.log(`idle VMs: server RSS ${(rssBefore / MB).toFixed(1)} → ${(rssAfter / MB).toFixed(1)} MB, ${memory.sandboxes} sandboxes`);
    return {
      vms: options.idleVms,
      rssBeforeMb: rssBefore / MB,
      rssAfterMb: rssAfter / MB,
      perVmKb: (rssAfter - rssBefore) / options.idleVms,
      sandboxes: memory.sandboxes,
      sandboxPrivateMb: memory.privateKb / MB,
      createSeconds,
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

async function timed(call: Call): Promise<number> {
  const start = now();
  await call();
  return now() - start;
}

function summarize(samples: number[]): Latency {
  return { p50: percentile(samples, 50), p95: percentile(samples, 95), samples: samples.length };
}
