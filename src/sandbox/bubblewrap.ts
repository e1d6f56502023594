/**
 * The OS layer of confinement (DESIGN §4, layer 3): the bubblewrap command line
 * for one guest. Own user, PID, network, IPC, UTS and mount namespaces; the VM
 * directory as `/`; system libraries, the Node runtime and the guest preload
 * read-only; every capability dropped; dies with the server.
 */
import { execFile } from "node:child_process";
import { existsSync, lstatSync, readlinkSync } from "node:fs";
import { promisify } from "node:util";
import { AgentVmError } from "../errors.ts";

/** Where things appear inside the sandbox. */
export const GUEST_NODE = "/opt/node/bin/node";
const GUEST_NODE_DIR = "/opt/node";
export const GUEST_PRELOAD_DIR = "/opt/agentvm";
export const GUEST_HOME = "/home/agentos";
export const GUEST_UID = 1000;

/** Host directories shared read-only with every guest (system libraries). */
const SYSTEM_DIRS = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"];

export const INSTALL_HINT =
  "agentvm runs guests under bubblewrap; install it with `sudo apt-get install bubblewrap` (Debian/Ubuntu) or `sudo dnf install bubblewrap`, or set AGENTVM_BWRAP to its path";

let checked: Promise<string> | undefined;

/** Resolves the bwrap binary once, or fails with a message that says how to get it. */
export function findBubblewrap(): Promise<string> {
  checked ??= (async () => {
    const binary = process.env.AGENTVM_BWRAP || "bwrap";
    try {
      await promisify(execFile)(binary, ["--version"], { timeout: 10_000 });
    } catch {
      throw new AgentVmError("SANDBOX_UNAVAILABLE", `bubblewrap (bwrap) was not found. ${INSTALL_HINT}`);
    }
    return binary;
  })();
  checked.catch(() => (checked = undefined));
  return checked;
}

export interface SandboxLayout {
  /** Host directory that is the VM's `/`. */
  root: string;
  /** Host path of the guest node binary. */
  nodeBinary: string;
  /** Host directory holding the guest preload (src/guest or dist/guest). */
  preloadDir: string;
  /** Guest working directory. */
  cwd: string;
}

/** Read-only binds of the host's real system directories (merged-/usr symlinks live in the VM root). */
function systemMounts(): string[] {
  return sandboxMountPoints().dirs.filter((dir) => SYSTEM_DIRS.includes(dir)).flatMap((dir) => ["--ro-bind", dir, dir]);
}

let cachedSystemMounts: string[] | undefined;

/** Mount points the VM root must contain before bwrap binds over them. */
export function sandboxMountPoints(): { dirs: string[]; files: string[]; symlinks: [string, string][] } {
  const dirs = ["/proc", "/dev", "/opt/node/bin", GUEST_PRELOAD_DIR, GUEST_HOME, "/tmp", "/etc"];
  const symlinks: [string, string][] = [];
  for (const dir of SYSTEM_DIRS) {
    if (!existsSync(dir)) continue;
    const info = lstatSync(dir);
    if (info.isSymbolicLink()) symlinks.push([dir, readlinkSync(dir)]);
    else if (info.isDirectory()) dirs.push(dir);
  }
  return { dirs, files: [GUEST_NODE], symlinks };
}

export function bubblewrapArgs(layout: SandboxLayout): string[] {
  cachedSystemMounts ??= systemMounts();
  return [
    "--unshare-all",
    "--unshare-user",
    "--disable-userns",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--uid",
    String(GUEST_UID),
    "--gid",
    String(GUEST_UID),
    "--hostname",
    "agentvm",
    "--bind",
    layout.root,
    "/",
    ...cachedSystemMounts,
    // The runtime directory is a fresh read-only tmpfs holding only the binary: the
    // VM root's own /opt/node would be writable (and is guest-controlled, so never a bind source).
    "--tmpfs",
    GUEST_NODE_DIR,
    "--ro-bind",
    layout.nodeBinary,
    GUEST_NODE,
    "--remount-ro",
    GUEST_NODE_DIR,
    "--ro-bind",
    layout.preloadDir,
    GUEST_PRELOAD_DIR,
    "--proc",
    "/proc",
    // Read-only: a writable /proc/self/mem lets a guest patch its own code, outside Node's permission model.
    "--remount-ro",
    "/proc",
    "--dev",
    "/dev",
    "--chdir",
    layout.cwd,
    "--clearenv",
  ];
}
