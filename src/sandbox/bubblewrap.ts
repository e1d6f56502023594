/**
 * The bubblewrap command line for one VM's sandbox (DESIGN §1, §4 layer 3):
 * own user, PID, network, IPC, UTS, mount and cgroup namespaces; the VM's
 * directory on disk as `/` (so `/home/agentos`, `/tmp` and whatever else the
 * VM or the files API creates persist), with the image's system directories
 * bound read-only over it; init as the first program. Nothing of the host's
 * filesystem is visible but the image and the VM's directory.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { lstat, rename, unlink } from "node:fs/promises";
import { promisify } from "node:util";
import { AgentVmError } from "../errors.ts";

export const GUEST_HOME = "/home/agentos";
/** Where init's code is mounted in every VM (on /run's tmpfs, so the image needs no mount point for it). */
export const INIT_DIR = "/run/agentvm";
/** Top-level entries of the image that the sandbox mounts; anything else in the image stays out. */
const IMAGE_ENTRIES = new Set(["bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt"]);
/** Mount points bubblewrap makes in the VM's directory besides the image's: kernel file systems and init's tmpfs. */
const SYSTEM_MOUNT_POINTS = ["proc", "dev", "run"];
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
  /** The VM's writable directory on disk, its `/`; see prepareMountPoints. */
  vmRoot: string;
  /** Host files copied read-only over the image's placeholders: `/etc/hosts`, `/etc/resolv.conf`. */
  etc: { hosts: string; resolvConf: string };
  /** The VM's settings for the Node preload, at /run/agentvm-guest.json. */
  guestConfig: string;
  /** Host directory with init's code (read-only, see init-code.ts), bound read-only at INIT_DIR. */
  initCode: string;
}

/**
 * Files and directories of /proc a guest has no use for and which tell about
 * the host or attack its kernel, after Docker's masked paths; only those this
 * kernel has are masked (bubblewrap cannot mount over what /proc lacks).
 */
const MASKED_PROC_FILES = ["kcore", "keys", "kallsyms", "kmsg", "timer_list", "timer_stats", "sched_debug", "latency_stats", "sysrq-trigger", "kpagecount", "kpageflags", "kpagecgroup", "config.gz"];
const MASKED_PROC_DIRS = ["acpi", "asound", "scsi", "bus", "fs", "irq", "driver", "tty", "sysvipc"];

/**
 * bubblewrap's arguments. Directories (the image, init's code) are bound from
 * paths the VM's host id may walk (staging.ts); files (/etc/hosts, the guest settings)
 * are handed over as open descriptors (`fd(path)` gives the number in
 * bubblewrap) and copied into the sandbox rather than bound, so no path of
 * theirs shows in the VM's /proc/self/mountinfo and none is read by bubblewrap.
 */
export function bubblewrapArgs(layout: SandboxLayout, fd: (hostPath: string) => number): string[] {
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
    // Root inside the VM's own user namespace, which maps it to the host id
    // bubblewrap runs as (never host root, see guest-identity.ts): the VM's
    // network namespace belongs to this user namespace, so init's capabilities
    // there work without any on the host.
    "--uid",
    "0",
    "--gid",
    "0",
    "--hostname",
    "agentvm",
    "--cap-drop",
    "ALL",
    ...INIT_CAPABILITIES.flatMap((cap) => ["--cap-add", cap]),
    "--bind",
    layout.vmRoot,
    "/",
    ...image,
    "--ro-bind-data",
    String(fd(layout.etc.hosts)),
    "/etc/hosts",
    "--ro-bind-data",
    String(fd(layout.etc.resolvConf)),
    "/etc/resolv.conf",
    "--tmpfs",
    "/run",
    // One read-only mount shared by every VM, not a copy per sandbox (see init-code.ts).
    "--ro-bind",
    layout.initCode,
    INIT_DIR,
    "--perms",
    "0444",
    "--file",
    String(fd(layout.guestConfig)),
    "/run/agentvm-guest.json",
    "--remount-ro",
    "/run",
    "--proc",
    "/proc",
    ...maskedProc(),
    "--dev",
    "/dev",
    "--chdir",
    GUEST_HOME,
    "--clearenv",
  ];
}

let masked: string[] | undefined;
function maskedProc(): string[] {
  masked ??= [
    ...MASKED_PROC_FILES.filter((name) => existsSync(`/proc/${name}`)).flatMap((name) => ["--ro-bind", "/dev/null", `/proc/${name}`]),
    ...MASKED_PROC_DIRS.filter((name) => existsSync(`/proc/${name}`)).flatMap((name) => ["--tmpfs", `/proc/${name}`, "--remount-ro", `/proc/${name}`]),
  ];
  return masked;
}

/**
 * Makes the VM directory's top-level mount points what bubblewrap expects,
 * before it runs: real directories (or nothing) for binds, nothing for the
 * image's symlinks (bubblewrap makes them and refuses existing ones).
 * bubblewrap, not yet in the sandbox, would follow a symlink a guest left at
 * such a name to a host path; no program of the VM runs while this checks
 * (the sandbox is about to start), so what is checked is what is used.
 * Symlinks are removed; anything else in the way is moved aside, never deleted.
 */
export async function prepareMountPoints(layout: Pick<SandboxLayout, "image" | "vmRoot">): Promise<void> {
  const wanted = new Map<string, { kind: "dir" | "symlink"; target?: string }>();
  for (const entry of layout.image.entries) if (IMAGE_ENTRIES.has(entry.name)) wanted.set(entry.name, entry);
  for (const name of SYSTEM_MOUNT_POINTS) wanted.set(name, { kind: "dir" });
  for (const [name, entry] of wanted) {
    const path = `${layout.vmRoot}/${name}`;
    const found = await lstat(path).catch(() => undefined);
    if (found === undefined) continue;
    if (entry.kind === "dir" && found.isDirectory()) continue;
    if (found.isSymbolicLink()) await unlink(path);
    else await rename(path, `${path}.moved-by-agentvm-${Date.now()}`);
  }
}
