/**
 * Just enough /proc to find VM sandboxes and read their memory.
 *
 * The VM API hides host pids on purpose, so the benchmark finds sandboxes the
 * way an operator would: each VM's sandbox is launched as a direct child of the
 * process that runs the VM (setpriv and prlimit exec into bwrap, so its name
 * reads "bwrap"), and bubblewrap's pid 1, init and every program of the VM hang
 * below it by parent pid.
 */
import { readdirSync, readFileSync } from "node:fs";

export interface ProcEntry {
  pid: number;
  ppid: number;
  comm: string;
}

/** Memory of one process in KiB, from /proc/<pid>/smaps_rollup. */
export interface ProcMemory {
  /** Private_Clean + Private_Dirty: what this process alone keeps resident. */
  privateKb: number;
  /** Proportional set size: private plus its share of shared pages. */
  pssKb: number;
  rssKb: number;
}

export function listProcesses(): ProcEntry[] {
  const entries: ProcEntry[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const entry = readStat(Number(name));
    if (entry) entries.push(entry);
  }
  return entries;
}

/** Parses /proc/<pid>/stat; the name sits in parentheses and may itself hold spaces or ')'. */
function readStat(pid: number): ProcEntry | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined; // exited while we were listing
  }
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  const fields = text.slice(close + 2).split(" ");
  return { pid, ppid: Number(fields[1]), comm: text.slice(open + 1, close) };
}

/** `root` and every process below it. */
export function processTree(root: number, all: readonly ProcEntry[]): ProcEntry[] {
  const children = new Map<number, ProcEntry[]>();
  for (const entry of all) children.set(entry.ppid, [...(children.get(entry.ppid) ?? []), entry]);
  const self = all.find((entry) => entry.pid === root);
  const tree: ProcEntry[] = self ? [self] : [];
  for (let i = 0; i < tree.length; i++) tree.push(...(children.get(tree[i]!.pid) ?? []));
  return tree;
}

/** VM sandboxes started by this process (embedded VMs): its direct children named bwrap. */
export function guestRoots(all: readonly ProcEntry[]): ProcEntry[] {
  return sandboxRootsOf(process.pid, all);
}

/**
 * VM sandboxes started by process `parent` (a server child): its direct
 * children that are bwrap, or still setpriv/prlimit on their way to exec it.
 */
export function sandboxRootsOf(parent: number, all: readonly ProcEntry[]): ProcEntry[] {
  return all.filter((entry) => entry.ppid === parent && (entry.comm === "bwrap" || entry.comm === "setpriv" || entry.comm === "prlimit"));
}

/** The NUL-separated command line of a process as a list ([] once it exited). */
export function readCmdline(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return [];
  }
}

/** Resident set size in KiB from /proc/<pid>/status (VmRSS); NaN once it exited. */
export function readRssKb(pid: number): number {
  try {
    return Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? Number.NaN);
  } catch {
    return Number.NaN;
  }
}

export function readMemory(pid: number): ProcMemory | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  } catch {
    return undefined;
  }
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? 0);
  return { privateKb: field("Private_Clean") + field("Private_Dirty"), pssKb: field("Pss"), rssKb: field("Rss") };
}

export function sumMemory(memories: readonly (ProcMemory | undefined)[]): ProcMemory {
  const total: ProcMemory = { privateKb: 0, pssKb: 0, rssKb: 0 };
  for (const memory of memories) {
    if (!memory) continue;
    total.privateKb += memory.privateKb;
    total.pssKb += memory.pssKb;
    total.rssKb += memory.rssKb;
  }
  return total;
}
