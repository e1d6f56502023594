/**
 * Memory per VM running one HTTP server: the private memory of every process
 * in the VM's sandbox (bubblewrap, init, the server), read from /proc — what
 * each VM really adds to the machine, shared library and binary pages
 * excluded — plus how much this host process grows per VM.
 *
 * The VMs run embedded (createVm) in this process, so their sandboxes are this
 * process's direct children (setpriv/prlimit exec into bwrap) and everything
 * in the VM hangs below them by parent pid.
 */
import type { Vm } from "agentvm";
import { startBaselineServer, directFetcher, newKeepAliveAgent } from "./baseline-server.ts";
import { GUEST_PORT, OK_SERVER, createBenchVm, startGuestServer } from "./guest.ts";
import { guestRoots, listProcesses, processTree, readCmdline, readMemory, sumMemory, type ProcEntry, type ProcMemory } from "./procfs.ts";
import { sleep } from "./stats.ts";

export interface MemoryResult {
  vms: number;
  /** Sandboxes found for those VMs (one each is expected). */
  sandboxes: number;
  /** Processes per sandbox, e.g. "bwrap, bwrap, init, node". */
  processes: string;
  /** Per VM, MiB: Private_Clean + Private_Dirty over the whole sandbox. */
  privateMb: number;
  /** Of privateMb: init alone, the user's program(s), the bwrap processes. */
  initPrivateMb: number;
  programPrivateMb: number;
  bwrapPrivateMb: number;
  pssMb: number;
  /** Growth of this process's RSS per VM, MiB. */
  hostRssMb: number;
}

export interface MemoryOptions {
  dataDir: string;
  vms: number;
  /** Requests each server answers before reading /proc (it has served, as in use). */
  requests: number;
  /** Time for allocations to settle before reading /proc. */
  settleMs: number;
  log(message: string): void;
}

const MB = 1024;
/** init's entry inside the sandbox (bubblewrap's own argv names it too, so match on node processes only). */
const INIT_ENTRY = /\/agentvm\/main\.js$/;

type Role = "bwrap" | "init" | "program";

function roleOf(entry: ProcEntry): Role {
  if (entry.comm === "bwrap" || entry.comm === "setpriv" || entry.comm === "prlimit") return "bwrap";
  return readCmdline(entry.pid).some((arg) => INIT_ENTRY.test(arg)) ? "init" : "program";
}

export async function benchMemory(options: MemoryOptions): Promise<MemoryResult> {
  const before = new Set(guestRoots(listProcesses()).map((entry) => entry.pid));
  const rssBefore = process.memoryUsage().rss;
  const vms: Vm[] = [];
  try {
    for (let i = 0; i < options.vms; i++) {
      const vm = await createBenchVm(options.dataDir, `bench-mem-${i}`);
      vms.push(vm);
      await startGuestServer(vm, "server.js", OK_SERVER);
      for (let r = 0; r < options.requests; r++) await vm.vmFetch(GUEST_PORT, "/");
    }
    await sleep(options.settleMs);
    const rssGrowth = process.memoryUsage().rss - rssBefore;
    const all = listProcesses();
    const trees = guestRoots(all)
      .filter((root) => !before.has(root.pid))
      .map((root) => processTree(root.pid, all));
    options.log(`memory: ${trees.length} sandboxes for ${vms.length} VMs`);
    return summarize(vms.length, trees, rssGrowth);
  } finally {
    await Promise.all(vms.map((vm) => vm.dispose()));
  }
}

function summarize(vmCount: number, trees: ProcEntry[][], rssGrowthBytes: number): MemoryResult {
  const processes = trees.flat().map((entry) => ({ entry, role: roleOf(entry), memory: readMemory(entry.pid) }));
  const of = (role?: Role) => sumMemory(processes.filter((p) => role === undefined || p.role === role).map((p) => p.memory));
  const total = of();
  const names = (trees[0] ?? []).map((entry) => (roleOf(entry) === "program" ? entry.comm.replace(/-MainThread$/, "") : roleOf(entry)));
  return {
    vms: vmCount,
    sandboxes: trees.length,
    processes: names.join(", "),
    privateMb: total.privateKb / MB / vmCount,
    initPrivateMb: of("init").privateKb / MB / vmCount,
    programPrivateMb: of("program").privateKb / MB / vmCount,
    bwrapPrivateMb: of("bwrap").privateKb / MB / vmCount,
    pssMb: total.pssKb / MB / vmCount,
    hostRssMb: rssGrowthBytes / (MB * MB) / vmCount,
  };
}

/** The same server in a plain Node child, after the same requests, for scale. */
export async function baselineServerMemory(options: Pick<MemoryOptions, "requests" | "settleMs">): Promise<ProcMemory | undefined> {
  const server = await startBaselineServer();
  const agent = newKeepAliveAgent();
  try {
    const fetchOnce = directFetcher(agent, server.port);
    for (let r = 0; r < options.requests; r++) await fetchOnce();
    await sleep(options.settleMs);
    return readMemory(server.pid);
  } finally {
    agent.destroy();
    await server.stop();
  }
}
