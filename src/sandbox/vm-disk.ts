/**
 * A VM's disk: caps on the bytes and inodes its `/` may hold (DESIGN §4 layer 3).
 *
 * Where the server runs as root, each VM's directory gets a sparse ext4 image
 * (`<vm dir>/disk.ext4`, `limits.diskBytes` long with `limits.diskInodes`
 * inodes) loop-mounted `nosuid,nodev` as its `root/`. The kernel enforces the
 * caps: a guest write past them fails with ENOSPC, and so does the server's
 * writeFile (VM_DISK_FULL); other VMs and the host's own disk are untouched.
 * The image is sparse and mounted with `discard`, so it holds on the host only
 * what the guest keeps. A second benefit: the VM's `/` is the root of its own
 * filesystem, so /proc/self/mountinfo in the VM names no host directory.
 *
 * Elsewhere (no root, no mkfs.ext4, no loop devices) the VM's `root/` is a
 * plain directory without caps; the server says so once, and usage() measures
 * the directory instead (docs/security.md).
 *
 * Sizes are fixed when the image is made: changing the limits later affects
 * new VMs (documented). The mount lives while a Vm object holds it and is
 * detached (lazily) when the last holder lets go.
 */
import { execFile } from "node:child_process";
import { lstat, mkdir, readdir, rename, rm, stat, statfs, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { runsAsRoot } from "./guest-identity.ts";
import { isMountPoint, oneAtATime } from "./staging.ts";

const run = promisify(execFile);
const IMAGE = "disk.ext4";
const MOUNT_OPTIONS = "loop,nosuid,nodev,noatime";
/** ext4 options: discard gives freed blocks back to the sparse image; noinit_itable skips zeroing inode tables the sparse file already reads as zeros. */
const FS_OPTIONS = "discard,noinit_itable";

export interface DiskLimits {
  bytes: number;
  inodes: number;
}

export interface DiskUsage {
  bytes: number;
  inodes: number;
  /** Whether the kernel caps them (a mounted image), or they are only measured. */
  capped: boolean;
}

/** Holders of each mounted root, so two Vm objects on one directory share one mount. */
const holders = new Map<string, number>();
let warned = false;

export class VmDisk {
  readonly #root: string;
  readonly capped: boolean;

  private constructor(root: string, capped: boolean) {
    this.#root = root;
    this.capped = capped;
  }

  /**
   * Makes `<vmDir>/root` the VM's capped disk (creating or mounting its image;
   * a directory from before the image existed is copied in once), or leaves it
   * a plain directory where the host cannot cap it.
   */
  static attach(vmDir: string, limits: DiskLimits): Promise<VmDisk> {
    const root = join(vmDir, "root");
    return oneAtATime(`disk:${root}`, () => VmDisk.#attach(vmDir, root, limits));
  }

  static async #attach(vmDir: string, root: string, limits: DiskLimits): Promise<VmDisk> {
    if (!runsAsRoot()) return uncapped(root, "the server does not run as root, so it cannot mount a per-VM disk image");
    const count = holders.get(root) ?? 0;
    if (count > 0 || (await isMountPoint(root))) {
      holders.set(root, count + 1);
      return new VmDisk(root, true);
    }
    const image = join(vmDir, IMAGE);
    try {
      const fresh = !(await stat(image).catch(() => undefined));
      if (fresh) await makeImage(image, limits);
      await mkdir(root, { recursive: true });
      const earlier = fresh ? await movedAside(root) : undefined;
      await run("mount", ["-t", "ext4", "-o", `${MOUNT_OPTIONS},${FS_OPTIONS}`, image, root], { timeout: 30_000 });
      holders.set(root, 1);
      if (earlier) await copyInto(earlier, root, image, vmDir);
      if (fresh) await rm(join(root, "lost+found"), { recursive: true, force: true });
      return new VmDisk(root, true);
    } catch (error) {
      await rm(`${join(vmDir, IMAGE)}.partial`, { force: true });
      return uncapped(root, `making or mounting its disk image failed (${(error as Error).message.split("\n")[0]}); is e2fsprogs installed and are loop devices available?`);
    }
  }

  /** A plain directory: usage measured, nothing capped. */
  static uncapped(root: string): VmDisk {
    return new VmDisk(root, false);
  }

  /** Bytes and inodes the VM's files take. */
  async usage(): Promise<DiskUsage> {
    if (this.capped) {
      const fs = await statfs(this.#root);
      return { bytes: (fs.blocks - fs.bfree) * fs.bsize, inodes: fs.files - fs.ffree, capped: true };
    }
    return { ...(await measure(this.#root)), capped: false };
  }

  /** Lets go of the mount; the last holder detaches it (lazily: a file the server still has open does not block it). */
  release(): Promise<void> {
    return this.capped ? oneAtATime(`disk:${this.#root}`, () => this.#release()) : Promise.resolve();
  }

  async #release(): Promise<void> {
    const count = (holders.get(this.#root) ?? 1) - 1;
    if (count > 0) return void holders.set(this.#root, count);
    holders.delete(this.#root);
    await run("umount", ["-l", this.#root], { timeout: 30_000 }).catch((error: Error) => console.warn(`agentvm: could not unmount a VM disk: ${error.message.split("\n")[0]}`));
  }
}

async function uncapped(root: string, why: string): Promise<VmDisk> {
  await mkdir(root, { recursive: true });
  if (!warned) console.warn(`agentvm: VMs run without disk byte and inode caps: ${why} (see docs/security.md)`);
  warned = true;
  return VmDisk.uncapped(root);
}

async function makeImage(image: string, limits: DiskLimits): Promise<void> {
  const partial = `${image}.partial`;
  await writeFile(partial, "");
  await truncate(partial, limits.bytes);
  // -m 0: no blocks kept for root, so the server's own writes meet the same cap. ext4 needs
  // at least a block per inode; the kernel rounds the count up to whole block groups.
  const inodes = Math.min(limits.inodes, Math.floor(limits.bytes / 4096));
  await run("mkfs.ext4", ["-q", "-F", "-m", "0", "-N", String(inodes), "-E", `lazy_itable_init=1,lazy_journal_init=1,nodiscard`, partial], {
    timeout: 60_000,
    env: { PATH: "/usr/sbin:/sbin:/usr/bin:/bin" },
  });
  await rename(partial, image);
}

/** A non-empty root directory from before the VM had a disk image: moved aside to be copied in. */
async function movedAside(root: string): Promise<string | undefined> {
  if ((await readdir(root)).length === 0) return undefined;
  const aside = `${root}.before-disk`;
  await rename(root, aside);
  await mkdir(root);
  return aside;
}

async function copyInto(from: string, root: string, image: string, vmDir: string): Promise<void> {
  try {
    // -a keeps owners, modes and links; the mount's nosuid,nodev keep whatever was there harmless.
    await run("cp", ["-a", "--", `${from}/.`, `${root}/`], { timeout: 600_000 });
    await rm(from, { recursive: true, force: true });
  } catch (error) {
    await run("umount", ["-l", root]).catch(() => {});
    holders.delete(root);
    await rm(root, { recursive: true, force: true });
    await rename(from, root);
    await rm(image, { force: true });
    throw new Error(`copying the VM's files (${vmDir}) into its new disk failed, the VM keeps its plain directory: ${(error as Error).message}`);
  }
}

/** Bytes (allocated blocks) and inodes under a directory, without following links; bounded by what is there. */
async function measure(root: string): Promise<{ bytes: number; inodes: number }> {
  let bytes = 0;
  let inodes = 0;
  const pending = [root];
  while (pending.length > 0) {
    const dir = pending.pop()!;
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) {
      const path = join(dir, entry.name);
      const found = await lstat(path).catch(() => undefined);
      if (!found) continue;
      inodes++;
      bytes += found.blocks * 512;
      if (entry.isDirectory()) pending.push(path);
    }
  }
  return { bytes, inodes };
}
