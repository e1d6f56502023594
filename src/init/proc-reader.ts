/**
 * What init reads of the VM from its own /proc: the namespace is the VM's, so
 * these are the VM's sockets and processes, nothing of the host's.
 */
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, readSync } from "node:fs";
import { EGRESS_PORTS, MAX_PS_REPLY_CHARS, type VmProcess } from "./protocol.ts";

const INIT_PORTS = new Set<number>(Object.values(EGRESS_PORTS));

/** Ports in LISTEN state (st 0A) in /proc/net/tcp and tcp6, but init's own egress ports. */
export function listeningPorts(): number[] {
  const ports = new Set<number>();
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = readFileSync(table, "utf8");
    } catch {
      continue; // no IPv6 in this kernel
    }
    for (const line of text.split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      const port = parseInt(fields[1]?.split(":")[1] ?? "", 16);
      if (fields[3] === "0A" && !INIT_PORTS.has(port)) ports.add(port);
    }
  }
  return [...ports].sort((a, b) => a - b);
}


/** The VM's processes from its own /proc (pid 1 is bubblewrap's reaper, this is init): what `ps` shows. */
export function vmProcesses(): VmProcess[] {
  const bootMs = Number(/^btime (\d+)$/m.exec(readFileSync("/proc/stat", "utf8"))?.[1]) * 1000;
  const out: VmProcess[] = [];
  for (const entry of readdirSync("/proc")) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid <= 2) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      // Fields after the command name, which may itself hold spaces and parentheses.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (fields[0] === "Z") continue;
      const argv = commandLine(pid);
      let cwd = "";
      try {
        cwd = readlinkSync(`/proc/${pid}/cwd`);
      } catch {
        // Exited meanwhile, or a kernel thread: no working directory to show.
      }
      // Clock ticks are 100 per second on Linux.
      out.push({ pid, ppid: Number(fields[1]), argv, cwd, startedAt: bootMs + Number(fields[19]) * 10 });
    } catch {
      // Exited while we looked.
    }
  }
  return out;
}

/**
 * The server keeps 4 KiB of a command line (src/sandbox/command-line-bounds.ts): init reads
 * twice that, so a command line of megabytes costs a fixed read, and the server still sees
 * that it was cut (and marks it).
 */
const COMMAND_LINE_READ_BYTES = 8192;
/** The control protocol's bound on one word (src/sandbox/control-channel.ts); a longer one arrives cut to it. */
const MAX_WORD_CHARS = 4096;

function commandLine(pid: number): string[] {
  const buffer = Buffer.alloc(COMMAND_LINE_READ_BYTES);
  const fd = openSync(`/proc/${pid}/cmdline`, "r");
  let size = 0;
  try {
    for (let read = -1; read !== 0 && size < buffer.length; size += read) read = readSync(fd, buffer, size, buffer.length - size, null);
  } finally {
    closeSync(fd);
  }
  const words = buffer.subarray(0, size).toString("utf8").split("\0");
  // A complete command line ends in NUL (an empty last word); a cut one keeps its partial last word.
  if (words.at(-1) === "") words.pop();
  return words.map((word) => word.slice(0, MAX_WORD_CHARS));
}

/**
 * The processes as they fit in one reply: the server cuts off a VM whose init sends a message
 * past its cap, and guests choose their own argv (a 2 MiB command line each is theirs to have).
 * Past `budget` characters of JSON, processes keep their pid and the start of their argv[0].
 */
export function fitProcesses(processes: VmProcess[], budget = MAX_PS_REPLY_CHARS): VmProcess[] {
  let used = 0;
  return processes.map((process) => {
    const size = JSON.stringify(process).length;
    if (used + size <= budget) {
      used += size;
      return process;
    }
    return { ...process, argv: process.argv.slice(0, 1).map((arg) => arg.slice(0, 64)), cwd: "" };
  });
}
