/**
 * agentvm benchmarks (DESIGN §5). `npm run bench` prints one table; `--json`
 * prints the raw results as JSON instead; `--image` times a full image build
 * into a fresh cache (downloads ~50 MB) instead of a cached ensureImage().
 * Progress goes to stderr so stdout holds only the report.
 *
 * Every agentvm number sits beside a baseline measured in the same run: a
 * plain Node process on the host's loopback doing the same work. Targets are
 * reported, never enforced: the process exits 0 on a miss.
 *
 * Order: memory first (this process's RSS per VM is not inflated by heap the
 * throughput runs grew), then the embedded benches (vmFetch, spawn, exec),
 * then the ones that run the server in a child process (previews, actions).
 */
import { availableParallelism } from "node:os";
import { benchExec } from "./exec.ts";
import { firstResponseStats, makeDataDir, OK_SERVER, createBenchVm, startGuestServer } from "./guest.ts";
import { benchImage } from "./image.ts";
import { baselineServerMemory, benchMemory } from "./memory.ts";
import { nginxAvailable, NGINX } from "./nginx.ts";
import { benchPreviews } from "./previews.ts";
import { downloadRows, fixed, imageRows, memoryRows, nginxRows, renderRows, serverRows, spawnRows, throughputRows, type Target } from "./report.ts";
import { benchServerActions } from "./server-actions.ts";
import { benchSpawnCold, benchSpawnHost, benchSpawnWarm, MILESTONES, type SpawnSummary } from "./spawn.ts";
import { now } from "./stats.ts";
import { benchVmFetch } from "./vm-fetch.ts";

const CONFIG = {
  fetch: { warmupMs: 1000, durationMs: 3000, rounds: 6, concurrencies: [1, 16] },
  spawn: { warm: { iterations: 30, warmupIterations: 2 }, cold: { iterations: 20, warmupIterations: 1 }, host: { iterations: 20, warmupIterations: 1 } },
  memory: { vms: 5, requests: 20, settleMs: 1000 },
  exec: { warmupCalls: 10, calls: 100, rounds: 4 },
  // downloadChunks × 64 KiB: 16384 = 1 GiB; the warm-up transfer is 64 MiB.
  previews: { warmupMs: 1000, durationMs: 3000, rounds: 6, concurrencies: [1, 16], downloadChunks: 16384, warmupChunks: 1024 },
  server: { roundTrip: { warmupCalls: 50, calls: 300, rounds: 3 }, createVms: 40, idleVms: 200 },
} as const;

const ratioAtLeast = (limit: number): Target => ({ kind: "min-ratio", limit });
const atMost = (limit: number, unit = ""): Target => ({ kind: "max-value", limit, unit });

/** DESIGN §5 "goal v2". */
const TARGETS = {
  vmFetch: { 1: ratioAtLeast(0.95), 16: ratioAtLeast(0.95) } as Record<number, Target>,
  preview: { 1: ratioAtLeast(0.6), 16: ratioAtLeast(0.6) } as Record<number, Target>,
  previewVsNginx: ratioAtLeast(1),
  downloadRatio: ratioAtLeast(0.8),
  /** "Flat": the server must not buffer the body; 64 MB is far below the 1 GiB it passes on. */
  downloadRssGrowthMb: atMost(64, " MB"),
  spawnWarmP50Ms: atMost(25, " ms"),
  spawnColdP50Ms: atMost(80, " ms"),
  createP50Ms: atMost(10, " ms"),
  privateMb: atMost(20, " MB"),
  /** Sandboxes for VMs that never ran a program. */
  idleSandboxes: atMost(0),
};

const started = now();
function log(message: string): void {
  process.stderr.write(`[bench ${((now() - started) / 1000).toFixed(1)}s] ${message}\n`);
}

async function main(): Promise<void> {
  const json = process.argv.includes("--json");
  const buildImage = process.argv.includes("--image");
  const dataDir = await makeDataDir();
  try {
    const image = await benchImage({ build: buildImage, log });
    await warmUpHost(dataDir.path);

    log("memory per VM");
    const memory = await benchMemory({ dataDir: dataDir.path, ...CONFIG.memory, log });
    const memoryBaseline = await baselineServerMemory(CONFIG.memory);

    log("vmFetch throughput");
    const vmFetch = await benchVmFetch({ dataDir: dataDir.path, ...CONFIG.fetch, log });

    log("spawn → first response");
    const spawnWarm = await benchSpawnWarm({ dataDir: dataDir.path, ...CONFIG.spawn.warm, log });
    const spawnCold = await benchSpawnCold({ dataDir: dataDir.path, ...CONFIG.spawn.cold, log });
    const spawnHost = await benchSpawnHost({ dataDir: dataDir.path, ...CONFIG.spawn.host, log });

    log("exec round trip");
    const exec = await benchExec({ dataDir: dataDir.path, ...CONFIG.exec, log });

    log("preview gateway and 1 GiB downloads (server in a child process)");
    const previews = await benchPreviews({ dataDir: dataDir.path, ...CONFIG.previews, log });

    log("server actions, VM creation and idle VMs (server in a child process)");
    const server = await benchServerActions({ dataDir: dataDir.path, ...CONFIG.server, log });
    log("done");

    const results = { image, memory: { vm: memory, baseline: memoryBaseline }, vmFetch, spawn: { warm: spawnWarm, cold: spawnCold, host: spawnHost }, exec, previews, server };
    if (json) {
      process.stdout.write(`${JSON.stringify({ config: CONFIG, targets: TARGETS, results, elapsedSeconds: (now() - started) / 1000 }, null, 2)}\n`);
      return;
    }
    const rows = [
      ...throughputRows("vmFetch", vmFetch, TARGETS.vmFetch),
      ...throughputRows("preview", previews.throughput, TARGETS.preview),
      ...nginxRows(previews, TARGETS.previewVsNginx),
      ...downloadRows(previews, { ratio: TARGETS.downloadRatio, rssGrowthMb: TARGETS.downloadRssGrowthMb }),
      ...spawnRows(spawnWarm, spawnCold, spawnHost, { warm: TARGETS.spawnWarmP50Ms, cold: TARGETS.spawnColdP50Ms }),
      ...serverRows(server, { createP50Ms: TARGETS.createP50Ms, sandboxes: TARGETS.idleSandboxes }),
      ...memoryRows(memory, memoryBaseline, TARGETS.privateMb),
      ...imageRows(image, exec),
    ];
    process.stdout.write(`\n${renderRows(rows)}\n\n${notes([spawnWarm, spawnCold, spawnHost], memory.processes)}\n`);
  } finally {
    await dataDir.remove();
  }
}

/** One throwaway VM so module loading and first-use JIT do not land in any measurement. */
async function warmUpHost(dataDir: string): Promise<void> {
  log("warming up the host (one throwaway VM)");
  const vm = await createBenchVm(dataDir, "bench-warmup");
  try {
    await startGuestServer(vm, "server.js", OK_SERVER);
  } finally {
    await vm.dispose();
  }
}

function milestones(summary: SpawnSummary): string {
  return MILESTONES.map(([key, name]) => `${name} ${fixed(summary.phasesP50[key])}`).join(", ");
}

function notes(spawns: SpawnSummary[], processes: string): string {
  const { fetch, previews, server } = CONFIG;
  return [
    `ratio = agentvm ÷ baseline, both measured in this run; PASS/MISS is informational. MB = 2^20 bytes (image size: 10^6).`,
    `machine: ${availableParallelism()} CPUs, Node ${process.versions.node}; total ${((now() - started) / 1000).toFixed(0)} s.`,
    `baseline: the same program in a plain Node child on 127.0.0.1 (no sandbox), same client (http.request, keep-alive Agent, same loop);`,
    `  per side ${fetch.warmupMs} ms warm-up, then ${fetch.durationMs} ms in ${fetch.rounds} slices alternating baseline and agentvm.`,
    `vmFetch: embedded Vm.vmFetch in this process into a guest http.createServer((q,s)=>s.end("ok")) on VM port 3000.`,
    `preview: the same loop against preview.url (the server's preview origin) on a server in a child process (gateway → VM port 3000).`,
    nginxAvailable()
      ? `nginx: ${NGINX}, 1 worker, upstream keep-alive, no buffering, in front of the baseline; ratio = (preview ÷ direct) ÷ (nginx ÷ direct).`
      : `nginx: ${NGINX} is not installed, so the "≥ nginx as a proxy" row is skipped (the bench does not install it).`,
    `download: a guest writes ${previews.downloadChunks} × 64 KiB with backpressure; the client reads and discards it (warm-up ${previews.warmupChunks} × 64 KiB`,
    `  per path first); RSS of the serving process sampled every 100 ms: the server child for client vmFetchStream (client →`,
    `  server's fetch route → VM) and preview, this process for embedded vm.vmFetchReadable; baseline = the stream server in plain Node.`,
    `spawn: spawn("node", ["first.js"]) then vmFetch until 200 (during a start-up grace after a spawn, vmFetch's one connect`,
    `  request waits in init, which probes the port every 2 ms; the bench retries ECONNREFUSED after that every ~1 ms); SIGKILL + waitProcess after each.`,
    `  warm = the VM's sandbox already runs (its first spawn is not counted); cold = a new VM, whose first spawn starts the sandbox.`,
    `  baseline = the same script started by child_process.spawn of the pinned Node on the host, polled with plain HTTP.`,
    `  guest milestones come from the server's own wall-clock stamps (node started = its performance.timeOrigin).`,
    ...spawns.map((spawn) => `  p50 ms after spawn(), ${spawn.label}: ${milestones(spawn)}.`),
    `  first responses that met ECONNRESET before their 200 (retried): ${firstResponseStats.withReset} of ${firstResponseStats.waits}.`,
    `VM create: getOrCreate(new key).writeFile(100 B) through the server for ${server.createVms} keys; baseline mkdir + writeFile behind plain HTTP.`,
    `actions: ${server.roundTrip.calls} sequential calls per side via the typed client, ${server.roundTrip.rounds} alternating rounds.`,
    `memory: ${CONFIG.memory.vms} embedded VMs, each one server that answered ${CONFIG.memory.requests} requests; private = Private_Clean + Private_Dirty`,
    `  from /proc/<pid>/smaps_rollup over the sandbox's process tree (${processes}); baseline = the server in plain Node.`,
    `image: ensureImage() timed in a fresh process (it memoizes); pass --image to build into a fresh cache instead.`,
    `exec: vm.exec("sh", ["-c", "true"]) in a VM whose sandbox runs vs child_process.execFile("sh", ["-c", "true"]) on the host.`,
    `idle VMs: ${server.idleVms} VMs through the server, one writeFile each; sandboxes = the server's bwrap children afterwards.`,
  ].join("\n");
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
