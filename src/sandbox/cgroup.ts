/**
 * One VM's control groups, for caps that hold for all its processes together:
 * memory (page cache and tmpfs such as /dev/shm and /run included), tasks
 * (processes and threads) and a CPU share. Made below the server's own groups,
 * so whatever confines the server confines its VMs too.
 *
 * Where: cgroup v1 memory, pids and cpu controllers the server may write
 * (a root server, or one given those directories). Elsewhere — cgroup v2
 * without delegation, an unprivileged server — VMs run without these caps and
 * the server says so once; per-process rlimits still apply (docs/security.md).
 *
 * Owns: the VM's group directories, from creation to removal.
 */
import { constants } from "node:fs";
import { access, mkdir, readdir, readFile, rmdir, writeFile } from "node:fs/promises";
import { join } from "node:path";

const ROOT = "/sys/fs/cgroup";
const CONTROLLERS = ["memory", "pids", "cpu"] as const;
type Controller = (typeof CONTROLLERS)[number];

export interface CgroupLimits {
  memoryBytes: number;
  tasks: number;
  /** Relative CPU weight among VMs (cgroup v1 cpu.shares; 1024 is one ordinary process group). */
  cpuShares: number;
}

export interface CgroupUsage {
  memoryBytes: number;
  memoryPeakBytes: number;
  tasks: number;
  /** Processes the kernel killed because the VM reached its memory cap. */
  oomKills: number;
}

export class VmCgroup {
  readonly #dirs: Record<Controller, string>;

  private constructor(dirs: Record<Controller, string>) {
    this.#dirs = dirs;
  }

  /**
   * Makes groups for one start of the VM's sandbox, with its limits, or
   * undefined where the host offers none. Each start gets groups of its own:
   * the last sandbox's may still hold memory (its tmpfs) while it is torn down.
   */
  static async create(name: string, limits: CgroupLimits): Promise<VmCgroup | undefined> {
    const bases = await writableBases();
    if (!bases) return undefined;
    const dirs = {} as Record<Controller, string>;
    const group = new VmCgroup(dirs);
    const id = `agentvm-${name}@${process.pid}-${++started}`;
    try {
      for (const controller of CONTROLLERS) {
        // "@" cannot be in a VM's directory name, so one VM's prefix never matches another's groups.
        await removeStale(bases[controller], `agentvm-${name}@`);
        dirs[controller] = join(bases[controller], id);
        await mkdir(dirs[controller]);
      }
      await group.#write("memory", "memory.limit_in_bytes", String(limits.memoryBytes));
      // Swap would let a VM past its cap where the host has swap; memsw exists only with swap accounting.
      await group.#write("memory", "memory.memsw.limit_in_bytes", String(limits.memoryBytes)).catch(() => {});
      await group.#write("pids", "pids.max", String(limits.tasks));
      await group.#write("cpu", "cpu.shares", String(limits.cpuShares));
    } catch (error) {
      // The server's own groups changed under it: this VM runs without caps, and says so.
      await group.remove();
      console.warn(`agentvm: VM ${name} runs without per-VM caps this time: ${(error as Error).message}`);
      return undefined;
    }
    return group;
  }

  /** Whether VMs on this host get control groups at all. */
  static async available(): Promise<boolean> {
    return (await writableBases()) !== undefined;
  }

  /** Files to write a pid into, so that process and everything it starts join the VM's groups. */
  get procsFiles(): string[] {
    return CONTROLLERS.map((controller) => join(this.#dirs[controller], "cgroup.procs"));
  }

  async usage(): Promise<CgroupUsage> {
    const read = async (controller: Controller, file: string) => Number((await readFile(join(this.#dirs[controller], file), "utf8")).trim());
    return {
      memoryBytes: await read("memory", "memory.usage_in_bytes"),
      memoryPeakBytes: await read("memory", "memory.max_usage_in_bytes"),
      tasks: await read("pids", "pids.current"),
      oomKills: Number(/^oom_kill (\d+)$/m.exec(await readFile(join(this.#dirs.memory, "memory.oom_control"), "utf8"))?.[1] ?? 0),
    };
  }

  /** Removes the groups once the sandbox is gone (one still holding tasks stays; the VM's next start removes it). */
  async remove(): Promise<void> {
    for (const dir of Object.values(this.#dirs)) await rmdir(dir).catch(() => {});
  }

  #write(controller: Controller, file: string, value: string): Promise<void> {
    return writeFile(join(this.#dirs[controller], file), value);
  }
}

let bases: Promise<Record<Controller, string> | undefined> | undefined;
let started = 0;

/** Empty groups of earlier starts of the VM (a server that was killed leaves them): removed; busy ones stay. */
async function removeStale(base: string, prefix: string): Promise<void> {
  for (const name of await readdir(base).catch(() => [] as string[])) {
    if (name.startsWith(prefix)) await rmdir(join(base, name)).catch(() => {});
  }
}

/** The server's own group of each controller, when all three are cgroup v1 directories it may write. */
function writableBases(): Promise<Record<Controller, string> | undefined> {
  bases ??= (async () => {
    const own = new Map<string, string>();
    for (const line of (await readFile("/proc/self/cgroup", "utf8").catch(() => "")).split("\n")) {
      const [, names, path] = line.split(":");
      for (const name of (names ?? "").split(",")) if (name && path !== undefined) own.set(name, path);
    }
    const found = {} as Record<Controller, string>;
    for (const controller of CONTROLLERS) {
      const path = own.get(controller);
      if (path === undefined) return unavailable(`no cgroup v1 ${controller} controller`);
      const dir = join(ROOT, controller, path);
      try {
        await access(dir, constants.W_OK);
      } catch {
        return unavailable(`${dir} is not writable by the server`);
      }
      found[controller] = dir;
    }
    return found;
  })();
  return bases;
}

function unavailable(why: string): undefined {
  console.warn(`agentvm: VMs run without per-VM memory, task and CPU caps: ${why} (see docs/security.md)`);
  return undefined;
}
