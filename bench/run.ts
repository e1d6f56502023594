/**
 * agentvm benchmarks (DESIGN §5). `npm run bench` prints a table; `--json`
 * prints the raw results as JSON instead. Progress goes to stderr so stdout
 * holds only the report.
 *
 * Order matters: memory runs first so the host-RSS-per-VM numbers are not
 * inflated by heap the throughput runs grew; throughput and spawn follow.
 * Targets are reported, never enforced: the process exits 0 on a miss.
 */
import { availableParallelism } from "node:os";
import { createBenchVm, firstResponseStats, makeDataDir, OK_SERVER, startGuestServer } from "./guest.ts";
import { baselineServerMemory, benchMemory } from "./memory.ts";
import { memoryRows, phaseRows, renderGrid, renderRows, spawnRows, throughputRows, type Target } from "./report.ts";
import { benchSpawn } from "./spawn.ts";
import { now } from "./stats.ts";
import { benchVmFetch } from "./vm-fetch.ts";

const CONFIG = {
  fetch: { warmupMs: 1000, durationMs: 3000, rounds: 6, concurrencies: [1, 16] },
  spawn: { iterations: 30, warmupIterations: 2, pauseMs: 200, coldIterations: 10 },
  memory: { vms: 5, settleMs: 1000 },
} as const;

const TARGETS = {
  fetch: { 1: { kind: "min-ratio", limit: 0.5 }, 16: { kind: "min-ratio", limit: 0.8 } } as Record<number, Target>,
  spawnP50Ms: { kind: "max-value", limit: 40 } as Target,
  privateMb: { kind: "max-value", limit: 15 } as Target,
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
    log("done");

    const results = { throughput, spawn: { warm: spawnWarm, cold: spawnCold }, memory: { pool0: memoryPool0, pool1: memoryPool1, baseline: memoryBaseline } };
    if (json) {
      process.stdout.write(`${JSON.stringify({ config: CONFIG, targets: TARGETS, results, elapsedSeconds: (now() - started) / 1000 }, null, 2)}\n`);
      return;
    }
    const rows = [
      ...throughputRows(throughput, TARGETS.fetch),
      ...spawnRows(spawnWarm, spawnCold, TARGETS.spawnP50Ms),
      ...memoryRows(memoryPool0, memoryPool1, memoryBaseline, TARGETS.privateMb),
    ];
    process.stdout.write(`\n${renderRows(rows)}\n\n${renderGrid(phaseRows(spawnWarm, spawnCold))}\n\n${notes()}\n`);
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

function notes(): string {
  const { fetch, spawn, memory } = CONFIG;
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
  ].join("\n");
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
