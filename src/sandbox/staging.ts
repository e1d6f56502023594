/**
 * Host directories bubblewrap mounts, made reachable for a VM's unprivileged
 * host id (guest-identity.ts). bubblewrap running as that id must be able to
 * walk to each directory it binds, but the image cache often lives under
 * root's home and the data directory may be 0700. Rather than open those up,
 * a server running as root bind-mounts each such directory at a neutral path,
 * `/run/agentvm/stage/<hash>`, and bubblewrap binds from there.
 * (bubblewrap's --bind-fd would avoid the paths, but bubblewrap 0.8 still
 * walks the descriptor's path as the unprivileged id and fails.)
 *
 * Read-only trees (the image, software layers) are staged as a read-only ext4
 * image of themselves, built once beside the tree (`<dir>.ext4`, about the
 * tree's size) and loop-mounted: then /proc/self/mountinfo in a VM shows
 * `/usr` of some loop device rather than the host path of the image cache
 * (a bind mount always shows its source's path). Where that fails they are
 * bound instead. They stay staged (a handful, shared by every VM, reused by
 * the next server); a VM's root is staged while its Vm object lives.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chmod, mkdir, readFile, rename, rm, rmdir, stat, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);
const STAGE = "/run/agentvm/stage";

const staged = new Map<string, { path: string; holders: number }>();

/** The staged path of `dir` (mounted read-only when `readOnly`); call release() when done with a writable one. */
export function stage(dir: string, readOnly: boolean): Promise<string> {
  return oneAtATime(dir, async () => {
    let entry = staged.get(dir);
    if (!entry) {
      const path = join(STAGE, createHash("sha256").update(dir).digest("hex").slice(0, 24));
      entry = { path, holders: 0 };
      await bind(dir, path, readOnly);
      staged.set(dir, entry);
    }
    entry.holders++;
    return entry.path;
  });
}

export function release(dir: string): Promise<void> {
  return oneAtATime(dir, async () => {
    const entry = staged.get(dir);
    if (!entry || --entry.holders > 0) return;
    staged.delete(dir);
    await run("umount", ["-l", entry.path], { timeout: 30_000 }).catch(() => {});
    await rmdir(entry.path).catch(() => {});
  });
}

/** The last mount or unmount step for each key: they run one after another (a VM waking while it is put to sleep). */
const queues = new Map<string, Promise<unknown>>();

/** Runs `step` after every earlier step for `key` has ended, successful or not. */
export function oneAtATime<T>(key: string, step: () => Promise<T>): Promise<T> {
  const next = (queues.get(key) ?? Promise.resolve()).catch(() => {}).then(step);
  queues.set(key, next);
  void next
    .finally(() => queues.get(key) === next && queues.delete(key))
    .catch(() => {});
  return next;
}

async function bind(dir: string, path: string, readOnly: boolean): Promise<void> {
  await mkdir(STAGE, { recursive: true });
  // Traversable, not listable: only a holder of a staged path's name gets in.
  await chmod("/run/agentvm", 0o711);
  await chmod(STAGE, 0o711);
  await mkdir(path, { recursive: true, mode: 0o700 });
  // A server that was killed leaves its staging mounted. A read-only tree is staged from a
  // content-addressed image and is reused as it is. A writable one (a VM's root) is reused only
  // while it still shows that directory: a VM disk deleted and made anew under the same path
  // (its data directory was removed, or the node's disk replaced) must not show the old one.
  if (await isMountPoint(path)) {
    if (readOnly || (await sameDirectory(dir, path))) return;
    await run("umount", ["-l", path], { timeout: 30_000 });
  }
  if (readOnly) {
    try {
      await run("mount", ["-t", "ext4", "-o", "loop,ro,nosuid,nodev,noatime", await treeImage(dir), path], { timeout: 60_000 });
      return;
    } catch (error) {
      console.warn(`agentvm: binding the image instead of mounting an ext4 copy of it (VMs see its host path in /proc/self/mountinfo): ${(error as Error).message.split("\n")[0]}`);
    }
  }
  await run("mount", ["--bind", dir, path], { timeout: 30_000 });
  await run("mount", ["-o", `remount,bind,nosuid,nodev${readOnly ? ",ro" : ""}`, path], { timeout: 30_000 });
}

/** `<dir>.ext4`, a read-only ext4 copy of the tree, made if missing (atomically: other servers may be making it too). */
async function treeImage(dir: string): Promise<string> {
  const image = `${dir}.ext4`;
  if (await stat(image).catch(() => undefined)) return image;
  const [bytes, inodes] = await Promise.all(
    [["-s", "-B1"], ["-s", "--inodes"]].map(async (flags) => Number((await run("du", [...flags, dir], { timeout: 120_000 })).stdout.split("\t")[0])),
  );
  const partial = `${image}.${process.pid}.partial`;
  try {
    await writeFile(partial, "");
    await truncate(partial, Math.ceil((bytes! * 1.2 + 64 * 1024 * 1024) / 4096) * 4096);
    await run("mkfs.ext4", ["-q", "-F", "-m", "0", "-O", "^has_journal", "-N", String(Math.ceil(inodes! * 1.2) + 1024), "-d", dir, "-E", "lazy_itable_init=1,nodiscard", partial], {
      timeout: 300_000,
      env: { PATH: "/usr/sbin:/sbin:/usr/bin:/bin" },
    });
    await rename(partial, image);
  } finally {
    await rm(partial, { force: true });
  }
  return image;
}

/** Whether two paths are the same directory (a bind mount's root is its source's inode on its source's device). */
async function sameDirectory(a: string, b: string): Promise<boolean> {
  const [x, y] = await Promise.all([stat(a), stat(b)]);
  return x.dev === y.dev && x.ino === y.ino;
}

/** Whether something is mounted at `dir` in the server's mount namespace (its mountinfo lists it). */
export async function isMountPoint(dir: string): Promise<boolean> {
  const table = await readFile("/proc/self/mountinfo", "utf8").catch(() => "");
  // Field 5 is the mount point, with spaces and the like octal-escaped.
  const escaped = dir.replace(/[\\ \t\n]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, "0")}`);
  return table.split("\n").some((line) => line.split(" ")[4] === escaped);
}
