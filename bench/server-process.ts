/**
 * An agentvm server in a separate child process (server-child.ts on the pinned
 * Node, from the TypeScript sources), plus what the benchmarks read about it
 * from /proc: its RSS, and the VM sandboxes it started (its direct bwrap
 * children, one per VM that has run a program). The benchmark process is only the client, as in production.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { AgentOsConfig, Registry, VmDefinition } from "agentvm";
import { PINNED_NODE } from "./baseline-server.ts";
import { listProcesses, processTree, readMemory, readRssKb, sandboxRootsOf, sumMemory, type ProcMemory } from "./procfs.ts";

/** The registry server-child.ts serves, for createClient's types. */
export type BenchRegistry = Registry<{ vm: VmDefinition }>;

const CHILD_SCRIPT = fileURLToPath(new URL("./server-child.ts", import.meta.url));

export interface ServerProcess {
  /** e.g. http://localhost:40123 */
  url: string;
  port: number;
  pid: number;
  /** The server process's VmRSS, KiB. */
  rssKb(): number;
  /** Pids of the VM sandboxes (bwrap roots) the server runs now. */
  sandboxes(): number[];
  /** Private/Pss/Rss summed over every sandbox's process tree (bwrap, init, the VM's programs). */
  sandboxMemory(): ProcMemory & { sandboxes: number };
  /** Closes the server (every VM's processes end) and waits for the process to exit. */
  stop(): Promise<void>;
}

/** `startOptions`: what registry.start() takes beyond port and dataDir (JSON only, e.g. auth). */
export async function startServerProcess(dataDir: string, config: AgentOsConfig = {}, startOptions: Record<string, unknown> = {}): Promise<ServerProcess> {
  const child = spawn(PINNED_NODE, ["--conditions=agentvm-source", CHILD_SCRIPT, dataDir, JSON.stringify(config), JSON.stringify(startOptions)], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const url = await readUrl(child);
  const pid = child.pid!;
  const sandboxes = () => sandboxRootsOf(pid, listProcesses()).map((entry) => entry.pid);
  return {
    url,
    port: Number(new URL(url).port),
    pid,
    rssKb: () => readRssKb(pid),
    sandboxes,
    sandboxMemory() {
      const all = listProcesses();
      const roots = sandboxRootsOf(pid, all);
      const processes = roots.flatMap((root) => processTree(root.pid, all));
      return { ...sumMemory(processes.map((entry) => readMemory(entry.pid))), sandboxes: roots.length };
    },
    stop: () => stopChild(child),
  };
}

function readUrl(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (chunk: string) => {
      text += chunk;
      // The first line that is only a URL: the server prints its own start-up lines too.
      const match = /^(http:\/\/\S+)\n/m.exec(text);
      if (match) resolve(match[1]!);
    });
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`bench server exited early (code ${code})`)));
  });
}

/** Ends stdin (the child closes its server cleanly); SIGKILL if that takes over 30 s. */
async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.stdin!.end();
  const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
  await exited;
  clearTimeout(timer);
}
