/**
 * agentvm benchmarks (DESIGN §5). `npm run bench` prints a table; `--json`
 * prints the raw results as JSON instead. Progress goes to stderr so stdout
 * holds only the report.
 *
 * Order matters: memory runs first so the host-RSS-per-VM numbers are not
 * inflated by heap the throughput runs grew; throughput and spawn follow.
 * Previews and server actions come last: they run the server in child
 * processes (server-process.ts), so this process's heap does not affect them.
 * Targets are reported, never enforced: the process exits 0 on a miss.
 */
import { availableParallelism } from "node:os";
import { createBenchVm, firstResponseStats, makeDataDir, OK_SERVER, startGuestServer } from "./guest.ts";
import { baselineServerMemory, benchMemory } from "./memory.ts";
import { benchPreviews } from "./previews.ts";
import { downloadRows, memoryRows, phaseRows, renderGrid, renderRows, serverActionRows, spawnRows, throughputRows, type Target } from "./report.ts";
import { benchServerActions, type ServerActionsResult } from "./server-actions.ts";
import { benchSpawn } from "./spawn.ts";
import { now } from "./stats.ts";
import { benchVmFetch } from "./vm-fetch.ts";

const CONFIG = {
  fetch: { warmupMs: 1000, durationMs: 3000, rounds: 6, concurrencies: [1, 16] },
  spawn: { iterations: 30, warmupIterations: 2, pauseMs: 200, coldIterations: 10 },
  memory: { vms: 5, settleMs: 1000 },
  // downloadChunks × 64 KiB: 16384 = 1 GiB; the warm-up transfer is 64 MiB.
  previews: { warmupMs: 1000, durationMs: 3000, rounds: 6, concurrencies: [1, 16], downloadChunks: 16384, warmupChunks: 1024 },
  server: { roundTrip: { warmupCalls: 50, calls: 300, rounds: 3 }, createVms: 40, idleVms: 200, pooledVms: 20, poolIdleMs: 2000 },
} as const;

const TARGETS = {
  fetch: { 1: { kind: "min-ratio", limit: 0.5 }, 16: { kind: "min-ratio", limit: 0.8 } } as Record<number, Target>,
  spawnP50Ms: { kind: "max-value", limit: 40 } as Target,
  privateMb: { kind: "max-value", limit: 15 } as Target,
  preview: { 1: { kind: "min-ratio", limit: 0.6 }, 16: { kind: "min-ratio", limit: 0.6 } } as Record<number, Target>,
  downloadRssGrowthMb: { kind: "max-value", limit: 64 } as Target,
  createP50Ms: { kind: "max-value", limit: 10 } as Target,
  /** Sandboxes for VMs that never spawned a process. */
  idleSandboxes: { kind: "max-value", limit: 0 } as Target,
};

const started = now();
function log(message: string): void {
  process.stderr.write(`[bench ${((now() - started) / 1000).toFixed(1)}s] ${message}\n`);
}

async function main(): Promise<void> {
  const json = process.argv.includes("--json");
  const dataDir = await makeDataDir();
  try {
    await warmUpHost(dataDir.path);

    log("memory per VM");
    const memoryPool0 = await benchMemory({ dataDir: dataDir.path, ...CONFIG.memory, log }, 0);
    const memoryPool1 = await benchMemory({ dataDir: dataDir.path, ...CONFIG.memory, log }, 1);
    const memoryBaseline = await baselineServerMemory(CONFIG.memory.settleMs);

    log("vmFetch throughput");
    const throughput = await benchVmFetch({ dataDir: dataDir.path, ...CONFIG.fetch, log });

    log("spawn → first response");
    const spawnWarm = await benchSpawn({ dataDir: dataDir.path, name: "bench-spawn-warm", poolSize: 1, ...CONFIG.spawn, log });
    const spawnCold = await benchSpawn({
      dataDir: dataDir.path,
      name: "bench-spawn-cold",
      poolSize: 0,
      iterations: CONFIG.spawn.coldIterations,
      warmupIterations: 1,
      // Nothing to refill without a pool; a short gap only lets the last guest's teardown finish.
      pauseMs: 20,
      log,
    });

    log("preview gateway (server in a child process)");
    const previews = await benchPreviews({ dataDir: dataDir.path, ...CONFIG.previews, log });

    log("server actions, VM creation and idle VMs (server in a child process)");
    const server = await benchServerActions({ dataDir: dataDir.path, ...CONFIG.server, log });
    log("done");

    const results = {
      throughput,
      spawn: { warm: spawnWarm, cold: spawnCold },
      memory: { pool0: memoryPool0, pool1: memoryPool1, baseline: memoryBaseline },
      previews,
      server,
    };
    if (json) {
      process.stdout.write(`${JSON.stringify({ config: CONFIG, targets: TARGETS, results, elapsedSeconds: (now() - started) / 1000 }, null, 2)}\n`);
      return;
    }
    const rows = [
      ...throughputRows(throughput, TARGETS.fetch),
      ...spawnRows(spawnWarm, spawnCold, TARGETS.spawnP50Ms),
      ...memoryRows(memoryPool0, memoryPool1, memoryBaseline, TARGETS.privateMb),
    ];
    const serverRows = [
      ...throughputRows(previews.throughput, TARGETS.preview, "preview"),
      ...downloadRows(previews, TARGETS.downloadRssGrowthMb),
      ...serverActionRows(server, { createP50Ms: TARGETS.createP50Ms, sandboxes: TARGETS.idleSandboxes }),
    ];
    process.stdout.write(
      `\n${renderRows(rows)}\n\n${renderGrid(phaseRows(spawnWarm, spawnCold))}\n\nserver in its own process (previews, actions, VM creation, idle VMs):\n${renderRows(serverRows)}\n\n${notes(server)}\n`,
    );
  } finally {
    await dataDir.remove();
  }
}

/** One throwaway VM + server so module loading and first-use JIT do not land in any measurement. */
async function warmUpHost(dataDir: string): Promise<void> {
  log("warming up the host (one throwaway VM)");
  const vm = await createBenchVm(dataDir, "bench-warmup", { poolSize: 0 });
  try {
    await startGuestServer(vm, "server.js", OK_SERVER);
  } finally {
    await vm.dispose();
  }
}

function notes(server: ServerActionsResult): string {
  const { fetch, spawn, memory, previews, server: serverConfig } = CONFIG;
  const { create } = server;
  const guestFree =
    create.sandboxesForKeys === 0
      ? `verified: no bwrap sandbox appeared for any of the ${create.vms} new keys (creating a VM starts no guest).`
      : `NOT verified: ${create.sandboxesForKeys} of ${create.vms} new keys got a bwrap sandbox
  (a pooled guest) from creation alone; the poolSize 0 rows show creation without that launch.`;
  return [
    `ratio = agentvm ÷ baseline, both measured in this run. PASS/MISS is informational.`,
    `machine: ${availableParallelism()} CPUs, Node ${process.versions.node}; total ${((now() - started) / 1000).toFixed(0)} s.`,
    `vmFetch: guest http.createServer((q,s)=>s.end("ok")) on VM port 3000 vs the same server in a plain`,
    `  Node child on 127.0.0.1; same client (http.request + keep-alive Agent, same loop); per side ${fetch.warmupMs} ms warm-up,
  then ${fetch.durationMs} ms measured in ${fetch.rounds} slices alternating baseline and vmFetch (shared noise).`,
    `spawn: spawn("node", ["first.js"]) then vmFetch every ~1 ms while ECONNREFUSED (ECONNRESET is retried
  too, and counted below); SIGKILL + waitProcess after each;`,
    `  warm: ${spawn.iterations} iterations with a ${spawn.pauseMs} ms pause after each so the pool refills (steady state);`,
    `  cold: poolSize 0, ${spawn.coldIterations} iterations. Milestone times come from the guest's own wall-clock stamps.`,
    `memory: ${memory.vms} VMs each running one server; private = Private_Clean + Private_Dirty from /proc/<pid>/smaps_rollup`,
    `  over each guest's bwrap + sandbox init + node, per VM; baseline column = the same server in a plain Node process.`,
    `  host RSS growth = this process's RSS after ÷ VMs (before: after a throwaway VM warmed the code paths).`,
    `first responses after a spawn, whole run: ${firstResponseStats.withReset} of ${firstResponseStats.waits} met ECONNRESET before their 200 (retried).`,
    `server table: the agentvm server (setup + agentOS, registry.start on port 0) runs in a child process on the pinned Node;`,
    `  its RSS is VmRSS from /proc/<pid>/status, its sandboxes are its direct bwrap children (a VM's is found by its root in bwrap's argv).`,
    `preview: the vmFetch loop and rounds against \${server.url}\${preview.path} (gateway → guest port 3000) vs the baseline server.`,
    `download: a guest writes ${previews.downloadChunks} × 64 KiB with backpressure; the client reads and discards it (MB = 2^20 bytes;
  ${previews.warmupChunks} × 64 KiB warm-up per path first); RSS sampled every 100 ms; baseline = the same server in plain Node.`,
    `actions: ${serverConfig.roundTrip.calls} sequential calls per side after ${serverConfig.roundTrip.warmupCalls} warm-up, ${serverConfig.roundTrip.rounds} alternating rounds, via the typed client;`,
    `  baseline = a plain Node HTTP server doing the same node:fs call, same fetch + JSON body (create: mkdir + writeFile).`,
    `VM create: getOrCreate(new key).writeFile(100 B) for ${create.vms} keys; guest-free creation ${guestFree}`,
    `  No VM in these rows ever spawned a process, so any sandbox of theirs is a warm-pool guest.`,
    `idle VMs: RSS before = after one throwaway VM warmed the server; after = once any guests' memory settled. VMs stay awake (sleepAfterMs).`,
    `pool: agentOS({ limits: { poolIdleMs: ${serverConfig.poolIdleMs} } }); ${serverConfig.pooledVms} new VMs each exec("node", ["-e", "0"]) in turn;`,
    `  pooled guests (sandboxes running the boot entry) and server RSS sampled every 100 ms until none is left.`,
  ].join("\n");
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
