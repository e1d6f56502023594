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
 * Elsewhere (no root, no mkfs.ext4, no loop devices, or AGENTVM_DISK_IMAGES=0)
 * the VM's `root/` is a plain directory and the caps are the server's: it
 * measures the directory (with `du`, off its event loop), refuses writeFile,
 * mkdir and spawn with VM_DISK_FULL once the VM is at a cap, and stops the
 * VM's processes when a measurement finds them past it (every 10 seconds while
 * they run). A guest can overshoot by what it writes between two
 * measurements; the server says so once (docs/security.md).
 *
 * Sizes are fixed when the image is made: changing the limits later affects
 * new VMs (documented). The mount lives while a Vm object holds it and is
 * detached (lazily) when the last holder lets go.
 */
import { execFile } from "node:child_process";
import { mkdir, readdir, rename, rm, stat, statfs } from "node:fs/promises";
import { AgentVmError } from "../errors.ts";
import { join } from "node:path";
import { promisify } from "node:util";
import { IMAGE, makeImage, mountImage, unmount, type DiskLimits } from "./disk-image.ts";
import { takePooledDisk } from "./disk-pool.ts";
import { runsAsRoot } from "./guest-identity.ts";
import { isMountPoint, oneAtATime } from "./staging.ts";

export type { DiskLimits } from "./disk-image.ts";

const run = promisify(execFile);

export interface DiskUsage {
  bytes: number;
  inodes: number;
  /** Whether the kernel caps them (a mounted image), or they are only measured. */
  capped: boolean;
}

/** Holders of each mounted root, so two Vm objects on one directory share one mount. */
const holders = new Map<string, number>();
let warned = false;

/** How often a VM on a plain directory is measured while its processes run. */
const WATCH_INTERVAL_MS = 10_000;
/** How old a measurement may be when the server checks a write against the caps. */
const MEASURE_MAX_AGE_MS = 2_000;

export class VmDisk {
  readonly #root: string;
  readonly #limits: DiskLimits;
  /** Whether the kernel enforces the caps (a mounted image); otherwise the server does. */
  readonly capped: boolean;
  #measured: { at: number; usage: Promise<{ bytes: number; inodes: number }> } | undefined;

  private constructor(root: string, limits: DiskLimits, capped: boolean) {
    this.#root = root;
    this.#limits = limits;
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
    if (process.env.AGENTVM_DISK_IMAGES === "0") return uncapped(root, limits, "AGENTVM_DISK_IMAGES=0");
    if (!runsAsRoot()) return uncapped(root, limits, "the server does not run as root, so it cannot mount a per-VM disk image");
    const count = holders.get(root) ?? 0;
    if (count > 0 || (await isMountPoint(root))) {
      holders.set(root, count + 1);
      return new VmDisk(root, limits, true);
    }
    const image = join(vmDir, IMAGE);
    let earlier: string | undefined;
    let fresh = false;
    try {
      fresh = !(await stat(image).catch(() => undefined));
      // A new VM's disk, made and mounted ahead of time by the server's pool: nothing left to do but own it.
      if (fresh && (await takePooledDisk(vmDir, limits))) {
        holders.set(root, 1);
        return new VmDisk(root, limits, true);
      }
      if (fresh) await makeImage(image, limits);
      await mkdir(root, { recursive: true });
      earlier = fresh ? await movedAside(root) : undefined;
      await mountImage(image, root);
      holders.set(root, 1);
      if (earlier) await copyInto(earlier, root, image, vmDir);
      if (fresh) await rm(join(root, "lost+found"), { recursive: true, force: true });
      return new VmDisk(root, limits, true);
    } catch (error) {
      await rm(`${join(vmDir, IMAGE)}.partial`, { force: true });
      // A mount that failed after the files were moved aside: they go back, and the
      // unusable image goes too, so the next start does not find an empty disk.
      // (copyInto puts them back itself when the copy fails: then `earlier` is gone.)
      if (earlier && !holders.has(root) && (await stat(earlier).catch(() => undefined))) {
        await rm(root, { recursive: true, force: true });
        await rename(earlier, root);
      }
      if (fresh && !holders.has(root)) await rm(image, { force: true });
      return uncapped(root, limits, `making or mounting its disk image failed (${(error as Error).message.split("\n")[0]}); is e2fsprogs installed and are loop devices available?`);
    }
  }

  /** A plain directory: the server measures it and holds the caps. */
  static uncapped(root: string, limits: DiskLimits): VmDisk {
    return new VmDisk(root, limits, false);
  }

  /** Bytes and inodes the VM's files take (a measurement at most `maxAgeMs` old where the kernel does not count them). */
  async usage(maxAgeMs = MEASURE_MAX_AGE_MS): Promise<DiskUsage> {
    if (this.capped) {
      const fs = await statfs(this.#root);
      return { bytes: (fs.blocks - fs.bfree) * fs.bsize, inodes: fs.files - fs.ffree, capped: true };
    }
    if (!this.#measured || Date.now() - this.#measured.at > maxAgeMs) {
      const usage = measure(this.#root);
      this.#measured = { at: Date.now(), usage };
      usage.catch(() => (this.#measured = undefined));
    }
    return { ...(await this.#measured.usage), capped: false };
  }

  /** Where the server holds the caps: refuses `op` with VM_DISK_FULL once the VM is at one. */
  async refuseIfFull(op: string): Promise<void> {
    if (this.capped) return;
    const used = await this.usage();
    if (used.bytes >= this.#limits.bytes || used.inodes >= this.#limits.inodes) {
      throw new AgentVmError(
        "VM_DISK_FULL",
        `${op}: the VM's files take ${used.bytes} bytes in ${used.inodes} inodes, at its limits (diskBytes ${this.#limits.bytes}, diskInodes ${this.#limits.inodes}); delete files in the VM, or give it larger limits`,
      );
    }
  }

  /**
   * Where the server holds the caps: measures every 10 seconds and calls
   * `onFull` when the VM is past one. Returns the function that stops watching.
   */
  watch(onFull: (usage: DiskUsage) => void): () => void {
    if (this.capped) return () => {};
    let busy = false;
    const timer = setInterval(() => {
      if (busy) return;
      busy = true;
      this.usage(0)
        .then((used) => {
          if (used.bytes > this.#limits.bytes || used.inodes > this.#limits.inodes) onFull(used);
        })
        .catch(() => {})
        .finally(() => (busy = false));
    }, WATCH_INTERVAL_MS);
    timer.unref();
    return () => clearInterval(timer);
  }

  /** Lets go of the mount; the last holder detaches it (lazily: a file the server still has open does not block it). */
  release(): Promise<void> {
    return this.capped ? oneAtATime(`disk:${this.#root}`, () => this.#release()) : Promise.resolve();
  }

  async #release(): Promise<void> {
    const count = (holders.get(this.#root) ?? 1) - 1;
    if (count > 0) return void holders.set(this.#root, count);
    holders.delete(this.#root);
    await unmount(this.#root).catch((error: Error) => console.warn(`agentvm: could not unmount a VM disk: ${error.message.split("\n")[0]}`));
  }
}

async function uncapped(root: string, limits: DiskLimits, why: string): Promise<VmDisk> {
  await mkdir(root, { recursive: true });
  if (!warned) console.warn(`agentvm: VM disks are plain directories whose caps the server measures and holds (a guest may overshoot between measurements): ${why} (see docs/security.md)`);
  warned = true;
  return VmDisk.uncapped(root, limits);
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
    await unmount(root).catch(() => {});
    holders.delete(root);
    await rm(root, { recursive: true, force: true });
    await rename(from, root);
    await rm(image, { force: true });
    throw new Error(`copying the VM's files (${vmDir}) into its new disk failed, the VM keeps its plain directory: ${(error as Error).message}`);
  }
}

/** Bytes (allocated blocks) and inodes under a directory, links not followed, measured by `du` in processes of its own. */
async function measure(root: string): Promise<{ bytes: number; inodes: number }> {
  const total = async (flags: string[]) => Number((await run("du", ["-s", "-x", ...flags, "--", root], { timeout: 120_000, maxBuffer: 1 << 20 }).catch((error: { stdout?: string }) => ({ stdout: error.stdout ?? "" }))).stdout.split("\t")[0]) || 0;
  const [bytes, inodes] = await Promise.all([total(["-B1"]), total(["--inodes"])]);
  return { bytes, inodes };
}
