/**
 * spawn → first HTTP response: the wait a user sees between starting a server
 * in a VM and getting its first answer through vmFetch.
 *
 * The guest server stamps its own timeline (program start, listen callback) on
 * the wall clock and returns it in the first response, so each iteration also
 * says where the time went: the spawn() call, handing the program to a booted
 * guest, the program's own start-up, and the first request. The "handled"
 * stamp is taken before s.end(), so the gap from it to the host's receipt is
 * the guest's first response path (its first Date header included).
 */
import type { Vm } from "agentvm";
import { GUEST_PORT, createBenchVm, firstResponse, stopGuest } from "./guest.ts";
import { percentile, sleep, wallNow } from "./stats.ts";

/**
 * Tiny server that reports its own milestones as wall-clock ms: when its node
 * process started (performance.timeOrigin — long before the spawn for a pooled
 * guest), when the program's first line ran, when listen() completed, and when
 * the first request reached the handler.
 */
const TIMELINE_SERVER = `
const wall = () => performance.timeOrigin + performance.now();
const started = wall();
let listening = 0;
require("node:http")
  .createServer((q, s) => s.end(JSON.stringify({ nodeStarted: performance.timeOrigin, started, listening, handled: wall() })))
  .listen(${GUEST_PORT}, () => { listening = wall(); });
`;

interface GuestTimeline {
  nodeStarted: number;
  started: number;
  listening: number;
  handled: number;
}

/** Milliseconds from the spawn() call to each milestone of one iteration. */
export interface SpawnMilestones {
  /** Negative when a pooled guest was used: its node had started before the spawn. */
  nodeStarted: number;
  spawnReturned: number;
  programStarted: number;
  listening: number;
  /** The host's first attempt that was not refused (the kernel knew the listener). */
  listenerSeen: number;
  handled: number;
  firstResponse: number;
}

export interface SpawnSample extends SpawnMilestones {
  attempts: number;
  /** ECONNRESETs met before the first 200 (the guest listen/accept race). */
  resets: number;
}

export interface SpawnSummary {
  label: string;
  iterations: number;
  pauseMs: number;
  samples: SpawnSample[];
  p50: number;
  p95: number;
  /** p50 of each milestone, ms after the spawn() call. */
  phasesP50: SpawnMilestones;
  /** Slowest spawn() call: far above the p50 means an iteration found the pool empty. */
  spawnCallMaxMs: number;
  /** Iterations that met at least one ECONNRESET before their first 200. */
  iterationsWithReset: number;
}

export interface SpawnOptions {
  dataDir: string;
  name: string;
  poolSize: number;
  iterations: number;
  /** Discarded first iterations (host-side JIT, first file reads). */
  warmupIterations: number;
  /** Pause after each kill so the pool can refill, as in steady state. */
  pauseMs: number;
  log(message: string): void;
}

export async function benchSpawn(options: SpawnOptions): Promise<SpawnSummary> {
  const vm = await createBenchVm(options.dataDir, options.name, { poolSize: options.poolSize });
  try {
    await vm.writeFile("/home/agentos/first.js", TIMELINE_SERVER);
    // createVm starts the pool in the background; give it time to boot once.
    await sleep(options.pauseMs);
    const samples: SpawnSample[] = [];
    for (let i = 0; i < options.warmupIterations + options.iterations; i++) {
      const sample = await spawnOnce(vm);
      if (i >= options.warmupIterations) samples.push(sample);
      await sleep(options.pauseMs);
    }
    options.log(`spawn → first response, ${options.name}: ${samples.length} iterations done`);
    return summarize(options, samples);
  } finally {
    await vm.dispose();
  }
}

async function spawnOnce(vm: Vm): Promise<SpawnSample> {
  const t0 = wallNow();
  const { pid } = await vm.spawn("node", ["first.js"]);
  const spawnReturned = wallNow();
  const first = await firstResponse(vm, GUEST_PORT, 10_000);
  const done = wallNow();
  const guest = JSON.parse(Buffer.from(first.body).toString("utf8")) as GuestTimeline;
  await stopGuest(vm, pid);
  return {
    nodeStarted: guest.nodeStarted - t0,
    spawnReturned: spawnReturned - t0,
    programStarted: guest.started - t0,
    listening: guest.listening - t0,
    listenerSeen: first.listenerSeenAt - t0,
    handled: guest.handled - t0,
    firstResponse: done - t0,
    attempts: first.attempts,
    resets: first.resets,
  };
}

const MILESTONES: (keyof SpawnMilestones)[] = ["nodeStarted", "spawnReturned", "programStarted", "listening", "listenerSeen", "handled", "firstResponse"];

function summarize(options: SpawnOptions, samples: SpawnSample[]): SpawnSummary {
  const totals = samples.map((sample) => sample.firstResponse);
  const phasesP50 = Object.fromEntries(MILESTONES.map((key) => [key, percentile(samples.map((sample) => sample[key]), 50)])) as unknown as SpawnMilestones;
  return {
    label: options.poolSize === 0 ? "cold (poolSize 0)" : `warm (poolSize ${options.poolSize})`,
    iterations: samples.length,
    pauseMs: options.pauseMs,
    samples,
    spawnCallMaxMs: Math.max(...samples.map((sample) => sample.spawnReturned)),
    iterationsWithReset: samples.filter((sample) => sample.resets > 0).length,
    p50: percentile(totals, 50),
    p95: percentile(totals, 95),
    phasesP50,
  };
}
