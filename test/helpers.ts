/**
 * Shared helpers for end-to-end tests: real VMs, real guests, no mocks.
 * Keep this file small and stable; several test files import it.
 */
import { after } from "node:test";
import { execFile } from "node:child_process";
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { promisify } from "node:util";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createVm, type CreateVmOptions, type Vm, type VmFetchInit, type VmFetchResponse } from "agentvm";

const vms: Vm[] = [];
const dirs: string[] = [];
// One hook for the whole test file, registered when this module loads (so at top
// level): VMs first, then their directories. `after()` called later, from inside
// a `before()` hook, would run as soon as that hook ends.
after(async () => {
  await Promise.all(vms.splice(0).map((vm) => vm.dispose()));
  await Promise.all(dirs.splice(0).map(async (dir) => {
    // A server still open may mount a disk its pool was making (src/sandbox/disk-pool.ts) while
    // the directory goes: then unmount again and retry (its next one fails: the directory is gone).
    for (let attempt = 1; ; attempt++) {
      await unmountUnder(dir);
      try {
        return await rm(dir, { recursive: true, force: true });
      } catch (error) {
        if (attempt === 5) throw error;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }));
});

/**
 * A VM's disk is a mount while a Vm holds it (src/sandbox/vm-disk.ts), and a
 * server a test file closes in its own after() still holds its VMs when this
 * file's hook runs: detach them so the directory can go. So are the staged
 * views of them (src/sandbox/staging.ts, under /run/agentvm/stage) that a
 * server killed by a test leaves behind: a stage whose source lies under `dir`
 * (a bind of it, or a loop device backed by a file in it) is detached too.
 */
export async function unmountUnder(dir: string): Promise<void> {
  const inside = (path: string) => path.startsWith(`${dir}/`);
  const backing = (device: string) => {
    const loop = /^\/dev\/(loop\d+)$/.exec(device)?.[1];
    if (!loop) return "";
    try {
      return readFileSync(`/sys/block/${loop}/loop/backing_file`, "utf8").trim();
    } catch {
      return "";
    }
  };
  const points = readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .filter(Boolean)
    .map((line) => {
      const fields = line.split(" ");
      return { root: fields[3] ?? "", point: fields[4] ?? "", source: line.split(" - ")[1]?.split(" ")[1] ?? "" };
    })
    .filter(({ root, point, source }) => inside(point) || (point.startsWith("/run/agentvm/stage/") && (inside(root) || inside(backing(source)))))
    .map(({ point }) => point)
    .sort((a, b) => b.length - a.length);
  for (const point of points) await promisify(execFile)("umount", ["-l", point]).catch(() => {});
}

/** A fresh data directory for this test file, removed when the file's tests end. */
export async function tempDataDir(prefix = "agentvm-test-"): Promise<string> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), prefix)));
  dirs.push(dir);
  return dir;
}

/**
 * createVm for a test; the VM is disposed when
 * the file's tests end (dispose it earlier yourself if you like).
 */
export async function testVm(dataDir: string, options: Partial<CreateVmOptions> = {}): Promise<Vm> {
  const vm = await createVm({ ...options, dataDir });
  vms.push(vm);
  return vm;
}

export interface CollectedOutput {
  readonly stdout: string;
  readonly stderr: string;
  /** stdout and stderr interleaved in arrival order. */
  readonly all: string;
  /** Stops listening. */
  stop(): void;
}

/**
 * Gathers processOutput text for one pid. Start it right after spawn resolves:
 * the guest's program runs only after spawn returns its pid, and output is
 * delivered on a later turn of the event loop.
 */
export function collectOutput(vm: Vm, pid: number): CollectedOutput {
  const out = { stdout: "", stderr: "", all: "" };
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  const listener = (event: { pid: number; stream: "stdout" | "stderr"; data: Uint8Array }) => {
    if (event.pid !== pid) return;
    const text = decoders[event.stream].decode(event.data, { stream: true });
    out[event.stream] += text;
    out.all += text;
  };
  vm.on("processOutput", listener);
  return {
    get stdout() {
      return out.stdout;
    },
    get stderr() {
      return out.stderr;
    },
    get all() {
      return out.all;
    },
    stop: () => vm.off("processOutput", listener),
  };
}

/** Polls `check` until it returns a truthy value or the deadline passes. */
export async function waitFor<T>(check: () => T | Promise<T>, what: string, timeoutMs = 15_000, intervalMs = 20): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * Resolves with the match once the pid's output (stdout and stderr) matches
 * `regex`; fails with the output so far, or early if the process exits first.
 * It sees output from the moment it is called: call it right after spawn
 * resolves (no other await in between), or use collectOutput + waitFor.
 */
export async function waitForOutput(vm: Vm, pid: number, regex: RegExp, timeoutMs = 10_000): Promise<RegExpMatchArray> {
  const output = collectOutput(vm, pid);
  let exited: number | undefined;
  const onExit = (event: { pid: number; exitCode: number }) => {
    if (event.pid === pid) exited = event.exitCode;
  };
  vm.on("processExit", onExit);
  try {
    return await waitFor(
      () => {
        const match = output.all.match(regex);
        if (match) return match;
        // Output is emitted before exit, so no match by now means none will come.
        if (exited !== undefined) throw new Error(`process ${pid} exited with ${exited} before printing ${regex}; output: ${output.all}`);
        return null;
      },
      `process ${pid} to print ${regex} (output so far: ${JSON.stringify(output.all.slice(-500))})`,
      timeoutMs,
    );
  } finally {
    output.stop();
    vm.off("processExit", onExit);
  }
}

/** vmFetch, retried while nothing listens on the port yet (ECONNREFUSED). */
export async function waitForPort(vm: Vm, port: number, path = "/", timeoutMs = 10_000, init?: VmFetchInit): Promise<VmFetchResponse> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await vm.vmFetch(port, path, init);
    } catch (error) {
      if ((error as { code?: unknown }).code !== "ECONNREFUSED" || Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

/** Awaits a promise expected to reject; returns the error with its `code`. */
export async function rejection(promise: Promise<unknown> | (() => unknown)): Promise<Error & { code?: string }> {
  try {
    await (typeof promise === "function" ? promise() : promise);
  } catch (error) {
    return error as Error & { code?: string };
  }
  throw new Error("expected a rejection, but it resolved");
}

export const text = (bytes: Uint8Array): string => Buffer.from(bytes).toString("utf8");

/** Pids whose command line matches, plus all their descendants (read from /proc). */
export function processTree(matches: (cmdline: string, pid: number) => boolean, exclude: number): number[] {
  const parents = new Map<number, number>();
  const roots: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      if (stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) continue;
      parents.set(pid, Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
      if (pid !== exclude && matches(cmdline, pid)) roots.push(pid);
    } catch {
      // exited while we looked
    }
  }
  const found = new Set(roots);
  for (let grew = true; grew; ) {
    grew = false;
    for (const [pid, ppid] of parents) {
      if (!found.has(pid) && found.has(ppid)) {
        found.add(pid);
        grew = true;
      }
    }
  }
  return [...found];
}

/**
 * Host pids of the bubblewrap processes that run VM sandboxes (their command
 * line holds no host path: bubblewrap reads its arguments from a pipe). With
 * `vmRoot` (a VM's root, or a directory of VMs), only those: a sandbox's `/`
 * is its VM's disk (the device mounted at the VM's root on the host) or, where
 * VMs have no disk image, a bind of the VM's directory.
 */
export function sandboxRoots(vmRoot?: string): number[] {
  const roots: number[] = [];
  const disks = vmRoot === undefined ? new Set<string>() : disksUnder(vmRoot);
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
      if (!argv[0]?.endsWith("bwrap") || argv[1] !== "--args" || !argv.includes("/run/agentvm/main.js")) continue;
      const children = readFileSync(`/proc/${entry}/task/${entry}/children`, "utf8").trim().split(/\s+/).filter(Boolean);
      // The outer bubblewrap stays in the host's namespaces; its child is the sandbox.
      if (children.length === 0) continue;
      // mountinfo's fourth field is the mounted directory: the VM's root, or a directory below it.
      const mounts = readFileSync(`/proc/${children[0]}/mountinfo`, "utf8").split("\n").map((line) => line.split(" "));
      if (vmRoot !== undefined && !mounts.some((fields) => fields[3]?.startsWith(vmRoot) || (fields[4] === "/" && fields[3] === "/" && disks.has(fields[2]!)))) continue;
      roots.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return roots;
}

/** "major:minor" of the VM disks mounted at `path` or below it (mountinfo's third field), as the host sees them. */
function disksUnder(path: string): Set<string> {
  const disks = new Set<string>();
  for (const fields of readFileSync("/proc/self/mountinfo", "utf8").split("\n").map((line) => line.split(" "))) {
    const point = fields[4] ?? "";
    if (fields[3] === "/" && (point === path || point.startsWith(`${path}/`))) disks.add(fields[2]!);
  }
  return disks;
}

/** Host pids of every process of the VM sandboxes under `ancestor` (or of one VM's, with `vmRoot`). */
export function sandboxProcessTree(vmRoot?: string, exclude = process.pid): number[] {
  const roots = new Set(sandboxRoots(vmRoot));
  return processTree((_cmdline, pid) => roots.has(pid), exclude);
}

/** Host paths of the files process `pid` has open under `dir` (read from /proc). */
export function openFilesUnder(pid: number, dir: string): string[] {
  const open: string[] = [];
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      if (target.startsWith(dir)) open.push(target);
    } catch {
      // closed while we looked
    }
  }
  return open;
}
