/**
 * One VM's processes: VM-local pids, guest launch (from the pool when it can),
 * stdio, signals, exit codes and the per-VM process cap. Every process is a real
 * Node.js in its own sandbox; a guest's `child_process.spawn("node", …)` comes
 * here too (via its GuestLink) and becomes a sibling in the same VM.
 *
 * Owns: the pid counter and the table. Host pids never leave this file.
 */
import { readFile } from "node:fs/promises";
import { AgentVmError } from "../errors.ts";
import { GuestPool, type PooledGuest } from "../sandbox/guest-pool.ts";
import type { LaunchedGuest, LaunchRequest } from "../sandbox/launcher.ts";
import { GUEST_HOME } from "../sandbox/bubblewrap.ts";
import { expectString, expectStringArray, expectStringRecord, expectObject, expectKnownKeys } from "../validate.ts";
import type { VmFilesystem } from "./filesystem.ts";
import { GuestLink, type ProcessServices } from "./guest-link.ts";
import type { SocketTable } from "./socket-table.ts";
import { readableOwner, writableOwner } from "./stdio-pipe.ts";
import { checkNodeCommand } from "./node-command.ts";

export interface SpawnOptions {
  cwd?: string;
  env?: Record<string, string>;
}

export interface ProcessInfo {
  pid: number;
  ppid: number;
  command: string;
  args: string[];
  cwd: string;
  running: boolean;
  exitCode: number | null;
  signal: string | null;
  startedAt: number;
}

export type OutputStream = "stdout" | "stderr";

export interface ProcessTableOptions {
  vmName: string;
  fs: VmFilesystem;
  sockets: SocketTable;
  maxProcesses: number;
  poolSize: number;
  poolIdleMs: number;
  /** Starts a sandboxed node with everything but mode, cwd and env decided by the VM. */
  launch(mode: LaunchRequest["mode"], cwd: string, env: Record<string, string>): LaunchedGuest;
  /** Resolves host names for guests (policy lives with the caller). */
  resolve(hostname: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]>;
  onOutput(pid: number, stream: OutputStream, data: Uint8Array): void;
  onExit(pid: number, exitCode: number, signal: string | null): void;
}

const DEFAULT_ENV: Record<string, string> = {
  HOME: GUEST_HOME,
  USER: "agentos",
  PATH: "/opt/node/bin:/usr/local/bin:/usr/bin:/bin",
  LANG: "C.UTF-8",
  TZ: "UTC",
};
const EXITED_KEPT = 200;
/** How long after a spawn vmFetch waits for a closed port to open (see VmFetcher). */
const STARTUP_GRACE_MS = 3000;

interface Guest extends PooledGuest {
  launched: LaunchedGuest;
  /** Exit code and signal, once the sandbox exited and its stdio closed. */
  closed: Promise<[number | null, NodeJS.Signals | null]>;
  link: GuestLink;
}

interface ValidatedSpawn {
  command: string;
  args: string[];
  cwd: string;
  env: Record<string, string>;
  mode: LaunchRequest["mode"];
}

class GuestProcess {
  readonly info: ProcessInfo;
  readonly guest: Guest;
  readonly exited: Promise<number>;
  #resolveExit!: (code: number) => void;

  constructor(info: ProcessInfo, guest: Guest) {
    this.info = info;
    this.guest = guest;
    this.exited = new Promise((resolve) => (this.#resolveExit = resolve));
  }

  finish(exitCode: number, signal: string | null): void {
    this.info.running = false;
    this.info.exitCode = exitCode;
    this.info.signal = signal;
    this.#resolveExit(exitCode);
  }
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGUSR1: 10, SIGUSR2: 12, SIGTERM: 15, SIGCONT: 18, SIGSTOP: 19 };

export class ProcessTable implements ProcessServices {
  readonly #options: ProcessTableOptions;
  readonly #processes = new Map<number, GuestProcess>();
  readonly #byLink = new Map<GuestLink, GuestProcess>();
  readonly #pool: GuestPool<Guest>;
  #nextPid = 1;
  #disposed = false;

  constructor(options: ProcessTableOptions) {
    this.#options = options;
    this.#pool = new GuestPool<Guest>({ size: options.poolSize, idleMs: options.poolIdleMs, start: () => this.#startGuest({ kind: "pooled" }, GUEST_HOME, {}) });
  }

  get running(): number {
    let count = 0;
    for (const process of this.#processes.values()) if (process.info.running) count++;
    return count;
  }

  /** Milliseconds until the newest running process is STARTUP_GRACE_MS old (0 when none is that young). */
  startupGraceMs(now = Date.now()): number {
    let grace = 0;
    for (const process of this.#processes.values()) {
      if (process.info.running) grace = Math.max(grace, process.info.startedAt + STARTUP_GRACE_MS - now);
    }
    return grace;
  }

  async spawn(command: unknown, args: unknown = [], options: unknown = {}, ppid = 0): Promise<{ pid: number }> {
    const request = this.#validate(command, args, options);
    const process = await this.#start(request, ppid);
    return { pid: process.info.pid };
  }

  async wait(pid: unknown): Promise<number> {
    return this.#get(pid, "waitProcess").exited;
  }

  list(): ProcessInfo[] {
    return [...this.#processes.values()].map((process) => ({ ...process.info, args: [...process.info.args] }));
  }

  async kill(pid: unknown, signal: unknown = "SIGTERM"): Promise<void> {
    const process = this.#get(pid, "killProcess");
    const name = typeof signal === "number" ? Object.keys(SIGNALS).find((key) => SIGNALS[key] === signal) : signal;
    if (typeof name !== "string" || !(name in SIGNALS)) {
      throw new AgentVmError("INVALID_ARGUMENT", `killProcess: unknown signal ${String(signal)}; use one of ${Object.keys(SIGNALS).join(", ")}`);
    }
    if (!process.info.running) return;
    await this.#signal(process, name);
  }

  writeStdin(pid: unknown, data: Uint8Array): Promise<void> {
    const process = this.#get(pid, "writeProcessStdin");
    const stdin = process.guest.launched.stdin;
    if (!process.info.running || stdin.writableEnded) {
      throw new AgentVmError("EPIPE", `writeProcessStdin: process ${process.info.pid} ${process.info.running ? "has its stdin closed" : "has exited"}`);
    }
    return new Promise((resolve, reject) => {
      stdin.write(data, (error) => (error ? reject(new AgentVmError("EPIPE", `writeProcessStdin: process ${process.info.pid}: ${error.message}`)) : resolve()));
    });
  }

  closeStdin(pid: unknown): void {
    this.#get(pid, "closeProcessStdin").guest.launched.stdin.end();
  }

  /** Ends every process and the pool; resolves when all have exited. */
  async dispose(): Promise<void> {
    this.#disposed = true;
    const pool = this.#pool.drain(true);
    const running = [...this.#processes.values()].filter((process) => process.info.running);
    for (const process of running) void process.guest.launched.kill();
    await Promise.all([pool, ...running.map((process) => process.exited)]);
  }

  // ProcessServices: what guests may ask for over their link.

  async spawnChild(parent: GuestLink, request: Record<string, unknown>): Promise<unknown> {
    const parentProcess = this.#byLink.get(parent);
    if (!parentProcess) throw new AgentVmError("ESRCH", "spawn: the calling process is not running");
    const validated = this.#validate(request.command, request.args ?? [], { cwd: request.cwd ?? parentProcess.info.cwd, env: request.env ?? {} });
    const stdio = Array.isArray(request.stdio) ? request.stdio.map(String) : ["pipe", "pipe", "pipe"];
    const child = await this.#start(validated, parentProcess.info.pid, stdio);
    const { launched } = child.guest;
    const ids: Record<string, number | null> = { stdin: null, stdout: null, stderr: null };
    if (stdio[0] === "pipe") {
      ids.stdin = parent.adopt((owner) => {
        const [guestEnd, parentEnd] = this.#options.sockets.pipe(writableOwner(launched.stdin, (bytes) => guestEnd.credit(bytes)), owner);
        return parentEnd;
      });
    } else {
      launched.stdin.end();
    }
    for (const [index, name] of [[1, "stdout"], [2, "stderr"]] as const) {
      if (stdio[index] !== "pipe") continue;
      const source = readableOwner(launched[name]);
      ids[name] = parent.adopt((owner) => {
        const [childEnd, parentEnd] = this.#options.sockets.pipe(source.owner, owner);
        source.attach(childEnd);
        return parentEnd;
      });
    }
    child.exited.then(() => {
      if (!parent.channel.closed) parent.event({ type: "exit", pid: child.info.pid, exitCode: child.info.exitCode, signal: child.info.signal });
    });
    return { pid: child.info.pid, ...ids };
  }

  killChild(_parent: GuestLink, pid: number, signal: string): void {
    void this.kill(pid, signal).catch(() => {});
  }

  resolve(hostname: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]> {
    return this.#options.resolve(hostname, pid);
  }

  // Internals.

  #get(pid: unknown, operation: string): GuestProcess {
    const process = typeof pid === "number" ? this.#processes.get(pid) : undefined;
    if (!process) {
      if (typeof pid !== "number" || !Number.isInteger(pid)) {
        throw new AgentVmError("INVALID_ARGUMENT", `${operation}: pid must be an integer, got ${JSON.stringify(pid)}`);
      }
      throw new AgentVmError("ESRCH", `${operation}: no process ${pid} in VM ${this.#options.vmName}; listProcesses() shows the pids`);
    }
    return process;
  }

  #validate(command: unknown, args: unknown, options: unknown): ValidatedSpawn {
    const name = expectString("command", command, { nonEmpty: true });
    const list = expectStringArray("args", args);
    const opts = expectObject("options", options ?? {});
    expectKnownKeys("options", opts, ["cwd", "env"]);
    const cwd = opts.cwd === undefined ? GUEST_HOME : expectString("options.cwd", opts.cwd, { nonEmpty: true, max: 4096 });
    const env = opts.env === undefined ? {} : expectStringRecord("options.env", opts.env);
    const { direct } = checkNodeCommand(name, list, env, this.#options.vmName);
    return { command: name, args: list, cwd, env, mode: direct ? { kind: "direct", nodeArgs: list } : { kind: "pooled" } };
  }

  async #start(request: ValidatedSpawn, ppid: number, stdio: string[] = ["pipe", "pipe", "pipe"]): Promise<GuestProcess> {
    const cwd = await this.#checkCwd(request.cwd);
    // Checked after the await and with no await until the table entry exists, so
    // concurrent spawns cannot all pass the cap, nor start a guest after dispose.
    if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed`);
    if (this.running >= this.#options.maxProcesses) {
      throw new AgentVmError("EAGAIN", `spawn: VM ${this.#options.vmName} already runs ${this.#options.maxProcesses} processes (limits.maxProcesses); wait for one to exit or kill one`);
    }
    const pid = this.#nextPid++;
    const env = { ...DEFAULT_ENV, ...request.env };
    let guest: Guest;
    if (request.mode.kind === "pooled") {
      guest = this.#pool.take() ?? this.#startGuest({ kind: "pooled" }, GUEST_HOME, {});
    } else {
      guest = this.#startGuest(request.mode, cwd, { ...env, AGENTVM_PID: String(pid), AGENTVM_PPID: String(ppid) });
      // A VM that runs programs will likely run more: have a pre-started guest ready for them.
      this.#pool.fill();
    }
    const info: ProcessInfo = { pid, ppid, command: request.command, args: request.args, cwd, running: true, exitCode: null, signal: null, startedAt: Date.now() };
    const process = new GuestProcess(info, guest);
    this.#processes.set(pid, process);
    this.#byLink.set(guest.link, process);
    guest.link.pid = pid;
    this.#trimExited();
    if (request.mode.kind === "pooled") {
      try {
        await guest.ready;
      } catch (error) {
        this.#processes.delete(pid);
        this.#byLink.delete(guest.link);
        // dispose() may be waiting for this process to exit.
        process.finish(guest.launched.child.exitCode ?? 128 + 9, guest.launched.child.signalCode);
        if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed while the process was starting`);
        throw error;
      }
      guest.link.event({ type: "run", argv: request.args, env, cwd, pid, ppid });
    }
    this.#wireOutput(process, stdio);
    // 'close' (not 'exit'): every output chunk has been emitted before the exit is reported.
    void guest.closed.then(([code, signal]) => {
      const exitCode = code ?? 128 + (signal ? (SIGNALS[signal] ?? 0) : 0);
      this.#byLink.delete(guest.link);
      guest.link.releaseAll();
      process.finish(exitCode, signal ?? (code !== null && code > 128 ? (Object.keys(SIGNALS).find((key) => SIGNALS[key] === code - 128) ?? null) : null));
      this.#options.onExit(pid, exitCode, process.info.signal);
    });
    return process;
  }

  #wireOutput(process: GuestProcess, stdio: string[]): void {
    const { launched } = process.guest;
    for (const [index, name] of [[1, "stdout"], [2, "stderr"]] as const) {
      const stream = launched[name];
      if (stdio[index] === "pipe" && process.info.ppid !== 0) continue; // the parent guest reads it
      if (stdio[index] === "ignore") {
        stream.resume();
        continue;
      }
      stream.on("data", (chunk: Buffer) => this.#options.onOutput(process.info.pid, name, new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength)));
    }
  }

  #startGuest(mode: LaunchRequest["mode"], cwd: string, env: Record<string, string>): Guest {
    const launched = this.#options.launch(mode, cwd, env);
    let bootLog = "";
    const collect = (chunk: Buffer) => {
      if (bootLog.length < 4096) bootLog += chunk.toString("utf8");
    };
    launched.stderr.on("data", collect);
    const { promise: ready, resolve: markReady, reject: failBoot } = Promise.withResolvers<void>();
    ready.catch(() => {});
    const link = new GuestLink(launched.channel, this.#options.sockets, this, {
      ready: () => {
        launched.stderr.off("data", collect);
        launched.stderr.pause();
        markReady();
      },
      closed: () => {},
    });
    launched.child.once("exit", (code, signal) => {
      failBoot(new AgentVmError("SPAWN_FAILED", `the guest sandbox exited (${signal ?? `code ${code}`}) before its program started: ${bootLog.trim() || "no output"}`));
    });
    launched.child.once("error", (error) => {
      failBoot(new AgentVmError("SPAWN_FAILED", `could not start the guest sandbox: ${error.message}`));
    });
    if (mode.kind === "direct") {
      launched.stderr.off("data", collect);
      markReady();
    }
    const closed = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
      launched.child.once("close", (code, signal) => resolve([code, signal]));
      // A sandbox that never started emits no 'close' to wait for.
      launched.child.once("error", () => launched.child.pid === undefined && resolve([null, null]));
    });
    return {
      launched,
      link,
      closed,
      ready,
      discard: () => {
        void launched.kill();
      },
    };
  }

  async #checkCwd(cwd: string): Promise<string> {
    let stat;
    try {
      stat = await this.#options.fs.stat(cwd);
    } catch (error) {
      const shaped = AgentVmError.from(error);
      throw new AgentVmError(shaped.code === "ENOENT" ? "ENOENT" : shaped.code, `spawn: working directory ${cwd} does not exist in VM ${this.#options.vmName}; create it with mkdir first`);
    }
    if (!stat.isDirectory) throw new AgentVmError("ENOTDIR", `spawn: working directory ${cwd} is not a directory`);
    return cwd.startsWith("/") ? cwd : `${GUEST_HOME}/${cwd}`;
  }

  /** Signals the guest's node directly (not the sandbox init, which would ignore it). */
  async #signal(process: GuestProcess, signal: string): Promise<void> {
    const { launched } = process.guest;
    if (signal === "SIGKILL") {
      await launched.kill();
      return;
    }
    const init = await launched.sandboxPid;
    let target: number | undefined;
    if (init !== undefined) {
      try {
        const children = (await readFile(`/proc/${init}/task/${init}/children`, "utf8")).trim().split(/\s+/);
        target = Number(children[0]) || undefined;
      } catch {
        target = undefined;
      }
    }
    try {
      if (target !== undefined) globalThis.process.kill(target, signal as NodeJS.Signals);
      else void launched.kill();
    } catch {
      // It exited in the meantime.
    }
  }

  #trimExited(): void {
    if (this.#processes.size <= EXITED_KEPT) return;
    for (const [pid, process] of this.#processes) {
      if (this.#processes.size <= EXITED_KEPT) break;
      if (!process.info.running) this.#processes.delete(pid);
    }
  }
}
