/**
 * Memory per VM running one HTTP server: the guests' private memory (what each
 * VM really adds to the machine, shared library and binary pages excluded)
 * read from /proc, plus how much this host process grows per VM (kernel,
 * socket table, channels).
 */
import type { Vm } from "agentvm";
import { startBaselineServer, directFetcher, newKeepAliveAgent } from "./baseline-server.ts";
import { OK_SERVER, createBenchVm, startGuestServer } from "./guest.ts";
import { guestRoots, listProcesses, processTree, readMemory, sumMemory, type ProcEntry, type ProcMemory } from "./procfs.ts";
import { sleep } from "./stats.ts";

export interface MemoryResult {
  label: string;
  poolSize: number;
  vms: number;
  /** Guest sandboxes found (each is bwrap + its init + node). */
  guests: number;
  /** Per VM, MiB, summed over all its guest process trees. */
  privateMb: number;
  /** Of privateMb: the node processes alone (the rest is the two bwrap processes). */
  nodePrivateMb: number;
  pssMb: number;
  /** Growth of this process's RSS per VM, MiB. */
  hostRssMb: number;
}

export interface MemoryOptions {
  dataDir: string;
  vms: number;
  /** Time for pool refills to boot and allocations to settle before reading /proc. */
  settleMs: number;
  log(message: string): void;
}

const MB = 1024;

export async function benchMemory(options: MemoryOptions, poolSize: number): Promise<MemoryResult> {
  const before = new Set(guestRoots(listProcesses()).map((entry) => entry.pid));
  const rssBefore = process.memoryUsage().rss;
  const vms: Vm[] = [];
  try {
    for (let i = 0; i < options.vms; i++) {
      const vm = await createBenchVm(options.dataDir, `bench-mem-pool${poolSize}-${i}`, { poolSize });
      vms.push(vm);
      await startGuestServer(vm, "server.js", OK_SERVER);
    }
    await sleep(options.settleMs);
    const rssGrowth = process.memoryUsage().rss - rssBefore;
    const all = listProcesses();
    const trees = guestRoots(all)
      .filter((root) => !before.has(root.pid))
      .map((root) => processTree(root.pid, all));
    options.log(`memory, poolSize ${poolSize}: ${trees.length} guest sandboxes for ${vms.length} VMs`);
    return summarize(poolSize, vms.length, trees, rssGrowth);
  } finally {
    await Promise.all(vms.map((vm) => vm.dispose()));
  }
}

function summarize(poolSize: number, vmCount: number, trees: ProcEntry[][], rssGrowthBytes: number): MemoryResult {
  const processes = trees.flat();
  const total = sumMemory(processes.map((entry) => readMemory(entry.pid)));
  // Node 26 names its main thread "node-MainThread"; the two others are bwrap.
  const nodes = sumMemory(processes.filter((entry) => entry.comm.startsWith("node")).map((entry) => readMemory(entry.pid)));
  return {
    label: `${vmCount} VMs, poolSize ${poolSize}`,
    poolSize,
    vms: vmCount,
    guests: trees.length,
    privateMb: total.privateKb / MB / vmCount,
    nodePrivateMb: nodes.privateKb / MB / vmCount,
    pssMb: total.pssKb / MB / vmCount,
    hostRssMb: rssGrowthBytes / (MB * MB) / vmCount,
  };
}

/** The same server in a plain Node child, after one request, for scale. */
export async function baselineServerMemory(settleMs: number): Promise<ProcMemory | undefined> {
  const server = await startBaselineServer();
  const agent = newKeepAliveAgent();
  try {
    await directFetcher(agent, server.port)();
    await sleep(settleMs);
    return readMemory(server.pid);
  } finally {
    agent.destroy();
    await server.stop();
  }
}
