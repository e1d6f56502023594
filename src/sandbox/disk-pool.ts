/**
 * VM disks made ahead of time, so creating a VM does not wait for mkfs.ext4
 * and a loop mount (about 20 ms of the request otherwise; see vm-disk.ts).
 *
 * A server running as root keeps, in `<dataDir>/disk-pool/` (0700, outside
 * every VM's `/`), a few entries laid out as a new VM directory: `disk.ext4`
 * made and mounted at `root/` by the same steps as on the request path
 * (disk-image.ts), `lost+found` removed as there, and an empty `etc/`. A new
 * VM takes one by renaming the entry onto its (still empty) directory: the
 * mount moves with its parent directory, so the VM's `root/` is its mounted
 * disk with no process started. What follows is the same as for a disk made
 * on the spot: the VM's id is given the root, its directories are made.
 *
 * One pool per configuration a VM was created with (limits.diskBytes and
 * limits.diskInodes), AGENTVM_DISK_POOL entries each (default 8, 0 turns the
 * pool off), for the 4 configurations used most recently; refilled one entry
 * at a time in the background after each take. An entry costs what a new
 * image holds on the host (its metadata: about 4 MB for the default 10 GiB
 * with a million inodes) and a loop device.
 *
 * An entry is built under a `making-` name and renamed `ready-` when whole, so
 * nothing half made is ever taken. A server discards the whole pool when it
 * starts (whatever a killed server left: half-made entries, mounts) and when
 * it closes, so a pool never outlives its server's configuration.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmod, lstat, mkdir, readdir, rename, rm, rmdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { AgentVmError } from "../errors.ts";
import { unmount, type DiskLimits } from "./disk-image.ts";
import type { MakeReply, MakeRequest } from "./disk-pool-maker.ts";
import { runsAsRoot } from "./guest-identity.ts";
import { isMountPoint } from "./staging.ts";

export const POOL_DIR = "disk-pool";
/** The maker process's program: the .ts beside this file when run from source, the .js in dist. */
const MAKER = fileURLToPath(new URL(`./disk-pool-maker${import.meta.url.endsWith(".ts") ? ".ts" : ".js"}`, import.meta.url));
/** How long after a VM took an entry the next is made (the rest of that VM's creation takes a few ms). */
const QUIET_MS = 20;
/** How long the maker process stays after its last entry, so a burst of VMs does not start it again and again. */
const MAKER_IDLE_MS = 10_000;
/** What one entry may take (mkfs.ext4 and mount have their own timeouts below this). */
const MAKE_TIMEOUT_MS = 120_000;
const MAKING = "making-";
const READY = "ready-";
const DEFAULT_SIZE = 8;
const MAX_SIZE = 64;
/** Configurations kept ready at once; a fifth evicts the one used longest ago. */
const MAX_CONFIGURATIONS = 4;

/** AGENTVM_DISK_POOL: entries kept ready per disk configuration (0 turns the pool off). */
export function diskPoolSize(raw = process.env.AGENTVM_DISK_POOL): number {
  if (raw === undefined || raw === "") return DEFAULT_SIZE;
  const size = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || size > MAX_SIZE) {
    throw new AgentVmError("INVALID_ARGUMENT", `AGENTVM_DISK_POOL must be a whole number of disk images from 0 to ${MAX_SIZE} (0 turns the pool off), got ${JSON.stringify(raw)}`);
  }
  return size;
}

interface Configuration {
  limits: DiskLimits;
  /** Entries ready to take (paths under the pool directory). */
  ready: string[];
  /** Whether an entry is being made for it. */
  making: boolean;
  usedAt: number;
}

/** Open pools by their data directory's `vms/`, where a VM's directory names its pool. */
const pools = new Map<string, DiskPool>();

export class DiskPool {
  readonly #dir: string;
  readonly #vmsDir: string;
  readonly #size: number;
  readonly #configurations = new Map<string, Configuration>();
  /** Whatever a previous server left is gone; until then nothing is taken or made. */
  readonly #cleaned: Promise<void>;
  #clean = false;
  #filling: Promise<void> | undefined;
  #closed = false;
  /** Set when making an entry failed: the request path makes disks itself (and says why if it too fails). */
  #broken = false;
  #uses = 0;
  /** When a VM last took an entry: the next is made once that VM is ready (QUIET_MS). */
  #tookAt = -Infinity;
  readonly #maker = new Maker();
  /** Takes under way: close() lets them finish before it discards what is left. */
  readonly #taking = new Set<Promise<boolean>>();

  private constructor(dataDir: string, size: number) {
    this.#dir = join(dataDir, POOL_DIR);
    this.#vmsDir = join(dataDir, "vms");
    this.#size = size;
    this.#cleaned = this.#discardAll(true).then(
      () => void (this.#clean = true),
      (error: Error) => this.#fail("could not clear what an earlier server left", error),
    );
  }

  /**
   * The pool of the data directory (absolute), opened by a server as it starts;
   * undefined where VM disks are not images (not root, AGENTVM_DISK_IMAGES=0) or
   * the pool is off (`size` 0). Each open is matched by a close().
   */
  static open(dataDir: string, size = diskPoolSize()): DiskPool | undefined {
    if (size === 0 || process.env.AGENTVM_DISK_IMAGES === "0" || !runsAsRoot()) return undefined;
    const vmsDir = join(dataDir, "vms");
    let pool = pools.get(vmsDir);
    if (!pool) pools.set(vmsDir, (pool = new DiskPool(dataDir, size)));
    pool.#uses++;
    return pool;
  }

  /** Entries ready now, per configuration (`<bytes>/<inodes>`). */
  ready(): Record<string, number> {
    return Object.fromEntries([...this.#configurations].map(([key, config]) => [key, config.ready.length]));
  }

  /** Resolves when no entry is being made (all configurations full, or the pool stopped). */
  async settled(): Promise<void> {
    await this.#cleaned;
    while (this.#filling) await this.#filling;
  }

  /** Stops refilling and discards every entry (unmounted, deleted); the last close of a data directory's pool does it. */
  async close(): Promise<void> {
    if (--this.#uses > 0) return;
    this.#closed = true;
    pools.delete(this.#vmsDir);
    await Promise.all(this.#taking);
    await this.settled();
    this.#maker.stop();
    await this.#discardAll(false).catch((error: Error) => console.warn(`agentvm: could not remove the VM disk pool: ${error.message.split("\n")[0]}`));
    await rmdir(this.#dir).catch(() => {});
  }

  /**
   * Gives the new VM directory `vmDir` a disk from the pool: true when its
   * `root/` is now that disk, mounted. Only for a directory that holds nothing
   * yet but an empty `etc/` and `root/`. Never throws: false means "make one".
   */
  take(vmDir: string, limits: DiskLimits): Promise<boolean> {
    if (this.#closed || this.#broken) return Promise.resolve(false);
    const taking = this.#take(vmDir, limits);
    this.#taking.add(taking);
    void taking.finally(() => this.#taking.delete(taking));
    return taking;
  }

  async #take(vmDir: string, limits: DiskLimits): Promise<boolean> {
    const config = this.#want(limits);
    if (!this.#clean) {
      void this.#cleaned.then(() => this.#fill());
      return false;
    }
    if (!(await holdsNothing(vmDir))) return false;
    // None ready (a burst past the pool): this VM makes its own disk as without a pool, while the
    // refill makes the next beside it, rather than waiting for that one: two at once, not one.
    const entry = config.ready.pop();
    if (entry) this.#tookAt = performance.now();
    this.#fill();
    if (!entry) return false;
    try {
      for (const dir of ["etc", "root"]) await rmdir(join(vmDir, dir)).catch((error: NodeJS.ErrnoException) => { if (error.code !== "ENOENT") throw error; });
      await rename(entry, vmDir);
      return true;
    } catch (error) {
      await mkdir(join(vmDir, "etc"), { recursive: true }).catch(() => {});
      await this.#discard(entry).catch(() => {});
      this.#fail(`could not move a pooled disk into ${vmDir}`, error as Error);
      return false;
    }
  }

  /** The configuration of `limits`, marked as just used; past MAX_CONFIGURATIONS the one used longest ago goes. */
  #want(limits: DiskLimits): Configuration {
    const key = `${limits.bytes}/${limits.inodes}`;
    let config = this.#configurations.get(key);
    if (!config) {
      config = { limits: { ...limits }, ready: [], making: false, usedAt: 0 };
      this.#configurations.set(key, config);
      if (this.#configurations.size > MAX_CONFIGURATIONS) {
        const [oldKey, old] = [...this.#configurations].sort(([, a], [, b]) => a.usedAt - b.usedAt)[0]!;
        this.#configurations.delete(oldKey);
        for (const stale of old.ready.splice(0)) void this.#discard(stale).catch(() => {});
      }
    }
    config.usedAt = performance.now();
    return config;
  }

  /** Makes entries, one at a time, until every configuration has `size` (ready or being made). */
  #fill(): void {
    if (!this.#clean) return;
    this.#filling ??= (async () => {
      for (;;) {
        if (this.#closed || this.#broken) return;
        const config = [...this.#configurations.values()].filter((c) => !c.making && c.ready.length < this.#size).sort((a, b) => b.usedAt - a.usedAt)[0];
        if (!config) return;
        // Not while a VM that just took an entry is still being prepared: making one competes with it for
        // the machine, and that request is what the pool is for. An empty configuration is refilled at
        // once: its VMs are making their own disks meanwhile.
        const wait = config.ready.length > 0 ? this.#tookAt + QUIET_MS - performance.now() : 0;
        if (wait > 0) {
          await sleep(wait);
          continue;
        }
        config.making = true;
        const entry = await this.#make(config.limits);
        config.making = false;
        if (!entry) continue;
        // Unless its configuration was evicted or the pool closed meanwhile.
        if (this.#closed || this.#configurations.get(`${config.limits.bytes}/${config.limits.inodes}`) !== config) await this.#discard(entry).catch(() => {});
        else config.ready.push(entry);
      }
    })().finally(() => (this.#filling = undefined));
  }

  /** One entry, built under a temporary name by the maker process and renamed when whole; undefined (and the pool stops) if that fails. */
  async #make(limits: DiskLimits): Promise<string | undefined> {
    const id = randomBytes(8).toString("hex");
    const entry = join(this.#dir, `${MAKING}${id}`);
    const ready = join(this.#dir, `${READY}${id}`);
    try {
      await mkdir(entry);
      // As prepareVmDirectory leaves a VM directory: 0700, nothing above it opened up.
      await chmod(entry, 0o700);
      await this.#maker.make({ entry, ready, bytes: limits.bytes, inodes: limits.inodes });
      return ready;
    } catch (error) {
      for (const left of [entry, ready]) await this.#discard(left).catch(() => {});
      // The data directory deleted under a running server: nothing to say, nothing more to make.
      if (!(await lstat(this.#dir).catch(() => undefined))) this.#broken = true;
      this.#fail("could not make a disk ahead of time", error as Error);
      return undefined;
    }
  }

  /** Unmounts an entry's disk if it is mounted, then deletes the entry. */
  async #discard(entry: string): Promise<void> {
    const root = join(entry, "root");
    if (await isMountPoint(root)) await unmount(root);
    await rm(entry, { recursive: true, force: true });
  }

  /** Every entry, ready or left by an earlier server; `create` makes the pool's directory (at open, not at close: the data directory may be gone). */
  async #discardAll(create: boolean): Promise<void> {
    if (create) {
      await mkdir(this.#dir, { recursive: true });
      await chmod(this.#dir, 0o700);
    }
    const entries = [...this.#configurations.values()].flatMap((config) => config.ready.splice(0));
    for (const name of await readdir(this.#dir).catch(() => [] as string[])) entries.push(join(this.#dir, name));
    for (const entry of new Set(entries)) await this.#discard(entry);
  }

  #fail(what: string, error: Error): void {
    if (this.#closed || this.#broken) return;
    this.#broken = true;
    console.warn(`agentvm: ${what} (${error.message.split("\n")[0]}); new VMs make their disks as they start`);
  }
}

/** vm-disk.ts's hook: a disk from the pool of the data directory `vmDir` lies in, if that pool is open and has one. */
export function takePooledDisk(vmDir: string, limits: DiskLimits): Promise<boolean> {
  return pools.get(dirname(vmDir))?.take(vmDir, limits) ?? Promise.resolve(false);
}

/** Whether `vmDir` is a new VM's: nothing in it but empty `etc/` and `root/` (either may be missing). */
async function holdsNothing(vmDir: string): Promise<boolean> {
  const names = await readdir(vmDir).catch(() => undefined);
  if (!names) return false;
  for (const name of names) {
    if (name !== "etc" && name !== "root") return false;
    const dir = join(vmDir, name);
    if (!(await lstat(dir).catch(() => undefined))?.isDirectory() || (await readdir(dir).catch(() => ["?"])).length > 0) return false;
  }
  return true;
}

/**
 * The maker process (disk-pool-maker.ts), started on the first entry and
 * stopped after MAKER_IDLE_MS without one: one entry at a time.
 */
class Maker {
  #child: ChildProcess | undefined;
  #idle: NodeJS.Timeout | undefined;

  make(request: MakeRequest): Promise<void> {
    clearTimeout(this.#idle);
    const child = (this.#child ??= this.#start());
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`making ${request.entry} took over ${MAKE_TIMEOUT_MS / 1000} s`)), MAKE_TIMEOUT_MS);
      const onReply = (reply: MakeReply) => {
        if (reply.entry === request.entry) done(reply.error === undefined ? undefined : new Error(reply.error));
      };
      const onExit = (code: number | null, signal: string | null) => done(new Error(`the disk pool's maker process exited (${signal ?? `code ${code}`})`));
      const done = (error: Error | undefined) => {
        clearTimeout(timer);
        child.off("message", onReply);
        child.off("exit", onExit);
        if (error) {
          this.stop();
          reject(error);
        } else {
          this.#idle = setTimeout(() => this.stop(), MAKER_IDLE_MS).unref();
          resolve();
        }
      };
      child.on("message", onReply);
      child.once("exit", onExit);
      child.send(request);
    });
  }

  /** Ends the maker process (by its pid, through its IPC channel: it exits when the server disconnects). */
  stop(): void {
    clearTimeout(this.#idle);
    const child = this.#child;
    this.#child = undefined;
    if (child?.connected) child.disconnect();
  }

  #start(): ChildProcess {
    // A small environment: no NODE_OPTIONS or test-runner settings of the server's carry over.
    const child = spawn(process.execPath, [MAKER], { stdio: ["ignore", "inherit", "inherit", "ipc"], env: { PATH: process.env.PATH ?? "/usr/sbin:/sbin:/usr/bin:/bin" } });
    child.once("exit", () => this.#child === child && (this.#child = undefined));
    // The server never waits for it to exit, and an idle maker keeps no event loop alive.
    child.unref();
    (child.channel as { unref?: () => void } | undefined)?.unref?.();
    return child;
  }
}
