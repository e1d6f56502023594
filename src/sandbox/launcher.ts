/**
 * Starts one confined guest Node.js process: OS limits (prlimit), then
 * bubblewrap, then node with the permission model and the agentvm preload.
 *
 * Two modes: `pooled` starts the guest entry, which boots, reports ready and
 * waits for the program to run (see guest-pool.ts); `direct` runs a command line
 * that carries its own node flags, with the preload required first.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readdirSync, statSync } from "node:fs";
import type { Duplex, Readable, Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import { bubblewrapArgs, GUEST_HOME, GUEST_NODE, GUEST_PRELOAD_DIR } from "./bubblewrap.ts";

/**
 * The guest code to mount at /opt/agentvm. Built JavaScript is preferred:
 * stripping TypeScript types in every guest costs ~50 ms of start-up and ~13 MB
 * of memory (measured). Running from src/, the build in dist/guest is used when
 * it is at least as new as every source file; otherwise the sources, with a note.
 */
function guestDirectory(): { dir: string; ext: ".js" | ".ts" } {
  const beside = fileURLToPath(new URL("../guest/", import.meta.url));
  if (existsSync(`${beside}boot.js`)) return { dir: beside, ext: ".js" };
  const built = fileURLToPath(new URL("../../dist/guest/", import.meta.url));
  if (existsSync(`${built}boot.js`) && existsSync(`${built}package.json`)) {
    const newestSource = Math.max(...readdirSync(beside).filter((name) => name.endsWith(".ts")).map((name) => statSync(`${beside}${name}`).mtimeMs));
    const oldestBuild = Math.min(...readdirSync(built).filter((name) => name.endsWith(".js")).map((name) => statSync(`${built}${name}`).mtimeMs));
    if (oldestBuild >= newestSource) return { dir: built, ext: ".js" };
    console.warn("agentvm: dist/guest is older than src/guest; guests run the TypeScript sources (slower start). Run `npm run build`.");
  }
  return { dir: beside, ext: ".ts" };
}

const GUEST_CODE = guestDirectory();
const PRELOAD_DIR = GUEST_CODE.dir;
const PRELOAD_EXT = GUEST_CODE.ext;
export const GUEST_BOOT = `${GUEST_PRELOAD_DIR}/boot${PRELOAD_EXT}`;
export const GUEST_PRELOAD = `${GUEST_PRELOAD_DIR}/preload${PRELOAD_EXT}`;

/** V8 and OS memory limits for one guest. */
export interface GuestLimits {
  /** V8 old-space cap (MiB). */
  heapMb: number;
  /** RLIMIT_DATA (MiB): V8 reserves address space beyond its heap, so this sits above heapMb. */
  dataMb: number;
  /** Open files per guest. */
  maxFiles: number;
}

export interface LaunchRequest {
  bwrap: string;
  nodeBinary: string;
  root: string;
  cwd: string;
  env: Record<string, string>;
  limits: GuestLimits;
  /** Arguments after the permission flags: the entry script (pooled) or the user's node args (direct). */
  mode: { kind: "pooled" } | { kind: "direct"; nodeArgs: string[] };
}

export interface LaunchedGuest {
  child: ChildProcess;
  stdin: Writable;
  stdout: Readable;
  stderr: Readable;
  /** The kernel channel (fd 3 in the guest). */
  channel: Duplex;
  /** Host pid of the sandbox's init process, once bubblewrap reports it. */
  sandboxPid: Promise<number | undefined>;
  /**
   * SIGKILLs the whole sandbox. Use this, not `child.kill`: bubblewrap arms
   * --die-with-parent only after it forked, so a sandbox whose bubblewrap is
   * killed while starting lives on (and holds the stdio open). Killing its init
   * (pid 1 of its PID namespace) ends every process inside.
   */
  kill(): Promise<void>;
}

let setprivPath: string | null | undefined;
function findSetpriv(): string | null {
  if (setprivPath === undefined) {
    setprivPath = ["/usr/bin/setpriv", "/bin/setpriv"].find((path) => existsSync(path)) ?? null;
    if (!setprivPath) console.warn("agentvm: setpriv not found (util-linux); guests may outlive a server that is killed with SIGKILL");
  }
  return setprivPath;
}

let prlimitPath: string | null | undefined;
function findPrlimit(): string | null {
  if (prlimitPath === undefined) {
    prlimitPath = ["/usr/bin/prlimit", "/bin/prlimit"].find((path) => existsSync(path)) ?? null;
    if (!prlimitPath) console.warn("agentvm: prlimit not found; guests run without an OS-level memory limit (V8 heap cap only)");
  }
  return prlimitPath;
}

export function permissionFlags(limits: GuestLimits): string[] {
  return [
    "--permission",
    // bubblewrap confines the filesystem (the VM dir is `/`, system dirs read-only),
    // so Node grants all of it. It must be `*`, not `/`: fs.symlink and fs.link
    // need "full" fs permissions, and npm packages, pnpm and bin links use them.
    "--allow-fs-read=*",
    "--allow-fs-write=*",
    `--max-old-space-size=${limits.heapMb}`,
    "--max-semi-space-size=2",
    "--disable-warning=ExperimentalWarning",
  ];
}

export function launchGuest(request: LaunchRequest): LaunchedGuest {
  // TZ: without it, the first Date formatting in a guest probes for a time zone (measured: ~7 ms).
  const env = { HOME: GUEST_HOME, PATH: "/opt/node/bin:/usr/local/bin:/usr/bin:/bin", TZ: "UTC", ...request.env };
  const setenv = Object.entries(env).flatMap(([key, value]) => ["--setenv", key, value]);
  const entry =
    request.mode.kind === "pooled" ? [GUEST_BOOT] : ["--require", GUEST_PRELOAD, ...request.mode.nodeArgs];
  const bwrap = [
    request.bwrap,
    "--info-fd",
    "4",
    ...bubblewrapArgs({ root: request.root, nodeBinary: request.nodeBinary, preloadDir: PRELOAD_DIR, cwd: request.cwd }),
    ...setenv,
    "--",
    GUEST_NODE,
    ...permissionFlags(request.limits),
    ...entry,
  ];
  const prlimit = findPrlimit();
  const limited = prlimit
    ? [prlimit, `--data=${request.limits.dataMb * 1024 * 1024}`, `--nofile=${request.limits.maxFiles}`, "--core=0", ...bwrap]
    : bwrap;
  // bubblewrap's --die-with-parent covers the sandboxed process, not bubblewrap itself:
  // without a death signal on bubblewrap, a killed server would leave its guests running.
  const setpriv = findSetpriv();
  const command = setpriv ? [setpriv, "--pdeathsig", "KILL", ...limited] : limited;
  const child = spawn(command[0]!, command.slice(1), {
    stdio: ["pipe", "pipe", "pipe", "pipe", "pipe"],
    env: {},
  });
  const info = child.stdio[4] as Readable;
  const sandboxPid = new Promise<number | undefined>((resolve) => {
    let text = "";
    info.setEncoding("utf8");
    info.on("data", (chunk: string) => {
      text += chunk;
      const match = /"child-pid"\s*:\s*(\d+)/.exec(text);
      // Keep reading to the end: closing early would SIGPIPE bubblewrap.
      if (match) resolve(Number(match[1]));
    });
    info.on("close", () => resolve(undefined));
    info.on("error", () => resolve(undefined));
  });
  const running = () => child.exitCode === null && child.signalCode === null;
  return {
    child,
    stdin: child.stdin!,
    stdout: child.stdout!,
    stderr: child.stderr!,
    channel: child.stdio[3] as Duplex,
    sandboxPid,
    async kill() {
      // bubblewrap reports the init's pid right after forking it (or closes the fd if it dies first).
      const init = running() ? await sandboxPid : undefined;
      // While bubblewrap runs, its init is alive or an unreaped zombie, so the pid is still its own.
      if (init !== undefined && running()) {
        try {
          process.kill(init, "SIGKILL");
        } catch {
          // Already gone.
        }
      }
      child.kill("SIGKILL");
    },
  };
}
