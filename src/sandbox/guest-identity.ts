/**
 * Which host user a VM's guests are (DESIGN §4 layer 3: guest root is never
 * host root).
 *
 * A server running as root gives each VM a host uid and gid of its own, from
 * an unprivileged range (AGENTVM_GUEST_IDS, default 1000000000-1999999999):
 * bubblewrap runs as that id and maps guest root to it in the VM's user
 * namespace. One id per VM, not one shared id, so that whatever a guest gets
 * past the mount namespace with, it still holds no permission on another VM's
 * files (each VM's directory is 0700 and owned by its own id).
 *
 * The id is remembered as the owner of the VM's root directory: a VM keeps its
 * id across restarts, and a directory from before (owned by root) is handed to
 * a new id once. Ids are unique among the VMs of one data directory (checked)
 * and spread over the range by a hash of the directory, so two data
 * directories on one host collide only by a one-in-a-billion chance per pair.
 *
 * A server running as another user needs none of this: bubblewrap maps guest
 * root to that user, who is not root.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { lstat, readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { AgentVmError } from "../errors.ts";

export interface GuestIdentity {
  uid: number;
  gid: number;
}

const DEFAULT_RANGE: [number, number] = [1_000_000_000, 1_999_999_999];
/** Set to 1 to run guests as host root anyway (trusted code only); the server says so on every start. */
const AS_ROOT_OVERRIDE = "AGENTVM_GUESTS_AS_HOST_ROOT";

export function runsAsRoot(): boolean {
  return process.getuid?.() === 0;
}

/** The configured range of host ids for guests. */
export function guestIdRange(): [number, number] {
  const raw = process.env.AGENTVM_GUEST_IDS;
  if (!raw) return DEFAULT_RANGE;
  const match = /^(\d+)-(\d+)$/.exec(raw.trim());
  const low = Number(match?.[1]);
  const high = Number(match?.[2]);
  if (!match || low < 1000 || high < low || high > 4_294_967_294) {
    throw new AgentVmError("INVALID_ARGUMENT", `AGENTVM_GUEST_IDS must be "<first>-<last>" host ids with 1000 ≤ first ≤ last < 4294967295, got ${JSON.stringify(raw)}`);
  }
  return [low, high];
}

let usable: Promise<boolean> | undefined;

/**
 * Whether an unprivileged id can make a user namespace here (the kernel may
 * forbid it: kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0,
 * or an AppArmor/SELinux policy). Tried once, with the real tools.
 */
function unprivilegedNamespacesWork(bwrap: string, id: number): Promise<boolean> {
  usable ??= promisify(execFile)("setpriv", [`--reuid=${id}`, `--regid=${id}`, "--clear-groups", bwrap, "--unshare-user", "--uid", "0", "--ro-bind", "/", "/", "true"], { timeout: 10_000 }).then(
    () => true,
    () => false,
  );
  return usable;
}

let warned = false;

/**
 * The identity a VM's guests get on the host, or undefined when guests run as
 * the server's own (non-root) user or, by explicit override, as root. Refuses
 * a root server that cannot drop guests to an unprivileged id.
 */
export async function guestIdentity(bwrap: string, dataDir: string, rootDir: string): Promise<GuestIdentity | undefined> {
  if (!runsAsRoot()) return undefined;
  if (process.env[AS_ROOT_OVERRIDE] === "1") {
    if (!warned) console.warn(`agentvm: WARNING: ${AS_ROOT_OVERRIDE}=1: guest root is host root (uid 0) in every VM; run only trusted code`);
    warned = true;
    return undefined;
  }
  const [low, high] = guestIdRange();
  if (!(await unprivilegedNamespacesWork(bwrap, low))) {
    throw new AgentVmError(
      "SANDBOX_UNAVAILABLE",
      "the server runs as root but this kernel does not let an unprivileged user make a user namespace, so guest root would be host root; " +
        "allow it (`sysctl -w kernel.unprivileged_userns_clone=1`, `sysctl -w user.max_user_namespaces=65536`, or on Ubuntu `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), " +
        `run the server as an unprivileged user, or set ${AS_ROOT_OVERRIDE}=1 to accept guests as host root (trusted code only)`,
    );
  }
  const owner = (await stat(rootDir).catch(() => undefined))?.uid;
  if (owner !== undefined && owner >= low && owner <= high) return { uid: owner, gid: owner };
  return allocate(dataDir, rootDir, low, high);
}

/** Allocations in flight in this process, so two VMs created at once never take the same id. */
const pending = new Set<number>();

async function allocate(dataDir: string, rootDir: string, low: number, high: number): Promise<GuestIdentity> {
  const taken = new Set(pending);
  const vms = join(dataDir, "vms");
  // All at once: one VM directory after another would make every new VM wait once per VM of the data directory.
  const owners = await Promise.all((await readdir(vms).catch(() => [] as string[])).map((name) => lstat(join(vms, name, "root")).then((found) => found.uid, () => undefined)));
  for (const uid of owners) if (uid !== undefined) taken.add(uid);
  const size = high - low + 1;
  const start = createHash("sha256").update(rootDir).digest().readUInt32BE(0) % size;
  for (let step = 0; step < size; step++) {
    const id = low + ((start + step) % size);
    if (taken.has(id)) continue;
    pending.add(id);
    // Freed once the caller has had time to make the directory its own (then the scan above sees it).
    setTimeout(() => pending.delete(id), 60_000).unref();
    return { uid: id, gid: id };
  }
  throw new AgentVmError("LIMIT_EXCEEDED", `every host id in AGENTVM_GUEST_IDS (${low}-${high}) belongs to a VM of this data directory; widen the range`);
}
