/**
 * The bubblewrap command line for one VM's sandbox (DESIGN §1, §4 layer 3):
 * own user, PID, network, IPC, UTS, mount and cgroup namespaces; a read-only
 * root built from the VM image; the VM's own `/home` and `/tmp` from its
 * directory on disk; init as the first program. Nothing of the host's
 * filesystem is visible but the image and the VM's directory.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { AgentVmError } from "../errors.ts";

export const GUEST_HOME = "/home/agentos";
/** Where init's code is mounted in every VM (on /run's tmpfs, so the image needs no mount point for it). */
export const INIT_DIR = "/run/agentvm";
/** Top-level entries of the image that the sandbox mounts; anything else in the image stays out. */
const IMAGE_ENTRIES = new Set(["bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt"]);
/**
 * What init keeps: binding the DNS port and writing the VM's port sysctls
 * (NET_BIND_SERVICE, NET_ADMIN in the VM's own namespaces only), and emptying
 * the bounding set of the programs it starts (SETPCAP). Programs get none.
 */
const INIT_CAPABILITIES = ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_SETPCAP"];

export const INSTALL_HINT =
  "agentvm runs VMs under bubblewrap; install it with `sudo apt-get install bubblewrap` (Debian/Ubuntu) or `sudo dnf install bubblewrap`, or set AGENTVM_BWRAP to its path";

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

/** The parts of a built image the sandbox needs (see image/). */
export interface SandboxImage {
  root: string;
  entries: readonly { name: string; kind: "dir" | "symlink"; target?: string }[];
  layers: readonly { dir: string; mountAt: string }[];
}

export interface SandboxLayout {
  image: SandboxImage;
  /** The VM's writable directory on disk. */
  vmRoot: string;
  /** Its top-level directories (real ones, checked before the VM's programs run), each bound at `/<name>`. */
  extraDirs: readonly string[];
  /** Host files bound read-only over the image's placeholders: `/etc/hosts`, `/etc/resolv.conf`. */
  etc: { hosts: string; resolvConf: string };
  /** Host directory with init's code. */
  initDir: string;
}

export function bubblewrapArgs(layout: SandboxLayout): string[] {
  const image: string[] = [];
  for (const entry of layout.image.entries) {
    if (!IMAGE_ENTRIES.has(entry.name)) continue;
    if (entry.kind === "symlink") image.push("--symlink", entry.target!, `/${entry.name}`);
    else image.push("--ro-bind", `${layout.image.root}/${entry.name}`, `/${entry.name}`);
  }
  for (const layer of layout.image.layers) image.push("--ro-bind", layer.dir, layer.mountAt);
  return [
    "--unshare-all",
    "--unshare-user",
    "--die-with-parent",
    "--new-session",
    // Root inside the VM's own user namespace, never on the host: the VM's
    // network namespace belongs to this user namespace, so init's capabilities
    // there work on hosts without privileges too.
    "--uid",
    "0",
    "--gid",
    "0",
    "--hostname",
    "agentvm",
    "--cap-drop",
    "ALL",
    ...INIT_CAPABILITIES.flatMap((cap) => ["--cap-add", cap]),
    ...image,
    "--ro-bind",
    layout.etc.hosts,
    "/etc/hosts",
    "--ro-bind",
    layout.etc.resolvConf,
    "/etc/resolv.conf",
    ...layout.extraDirs.flatMap((name) => ["--bind", `${layout.vmRoot}/${name}`, `/${name}`]),
    "--tmpfs",
    "/run",
    "--ro-bind",
    layout.initDir,
    INIT_DIR,
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    // The root itself (a tmpfs bubblewrap made) holds only mount points: read-only.
    "--remount-ro",
    "/",
    "--chdir",
    GUEST_HOME,
    "--clearenv",
  ];
}
