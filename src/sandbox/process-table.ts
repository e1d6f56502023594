/**
 * One VM's processes as the API sees them: the programs started through
 * `spawn`/`exec`, with their in-VM pids (the same `ps` shows inside), exit
 * codes, stdin and signals, and the per-VM process cap. The sandbox starts on
 * the first spawn and stays until the VM is disposed or it ends.
 *
 * Owns: the table of API-started processes and the sandbox handle. Programs
 * those processes start themselves are the VM's business (init reaps them).
 */
import { constants as osConstants } from "node:os";
import { AgentVmError } from "../errors.ts";
import { SIGNALS, type ListenWait, type TerminalSize } from "../init/protocol.ts";
import { expectKnownKeys, expectObject, expectString, expectStringArray, expectStringRecord } from "../validate.ts";
import { GUEST_HOME } from "./bubblewrap.ts";
import { SpawnPacer } from "./spawn-pacer.ts";
import { CommandLineBudget } from "./command-line-bounds.ts";
import type { VmSandbox } from "./vm-sandbox.ts";

/** 50 spawns at once, then 50 a second: far above what agents do, far below what would starve other VMs. */
export const SPAWN_PACE = { burst: 50, perSecond: 50, maxWaiting: 1000 };
/** A sandbox whose init keeps dying restarts 5 times at once, then once every 2 seconds. */
const SANDBOX_START_PACE = { burst: 5, perSecond: 0.5, maxWaiting: 1000 };

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
  /** Whether older output of this process fell out of its log (limits.logBytes); only for processes started through the API. */
  logDropped?: boolean;
  /** Set for a program started with openTerminal: it runs on a pseudo-terminal, its output is all "stdout". */
  terminal?: true;
  /** Set when the command line (or cwd) was cut to the listing's bounds (command-line-bounds.ts). */
  truncated?: true;
}

/** One chunk of a process's output, as kept in its log and sent to subscribers. */
export interface LoggedOutput {
  /** Position in the VM's output: increases by one per chunk, across all its processes. */
  seq: number;
  pid: number;
  stream: OutputStream;
  data: Uint8Array;
}

export type OutputStream = "stdout" | "stderr";

export interface ProcessTableOptions {
  vmName: string;
  maxProcesses: number;
  /** Environment every program starts with; a spawn's own `env` adds to it. */
  env: Record<string, string>;
  /** Starts the VM's sandbox, wired to this table's onOutput/onExit/onEnded. */
  startSandbox(): Promise<VmSandbox>;
  onOutput(pid: number, stream: OutputStream, data: Uint8Array, seq: number): void;
  onExit(pid: number, exitCode: number, signal: string | null): void;
  /** Bytes of recent output each process keeps for getProcessLogs and late subscribers. */
  logBytes: number;
}

/** Exited processes kept for listProcesses/waitProcess. */
const EXITED_KEPT = 200;
/** How long after a spawn vmFetch waits for a closed port to open (see VmFetcher). */
const STARTUP_GRACE_MS = 3000;

interface Entry {
  info: ProcessInfo;
  /** Until when (epoch ms) a connection to a closed port waits for this program to open it. */
  graceUntil: number;
  exited: PromiseWithResolvers<number>;
  /** Output that arrived before spawn() returned, delivered right after its caller resumed. */
  early: [OutputStream, Uint8Array][] | undefined;
  /** Its most recent output, oldest first, at most logBytes. */
  log: LoggedOutput[];
  logSize: number;
}

export class ProcessTable {
  readonly #options: ProcessTableOptions;
  readonly #entries = new Map<number, Entry>();
  #sandbox: Promise<VmSandbox> | undefined;
  #starting = 0;
  /** Position of the last output chunk delivered (see LoggedOutput.seq). */
  #seq = 0;
  /**
   * Output and exits for pids whose spawn reply is still on its way to spawn()'s
   * caller (a program can print and exit before that continuation runs). Only
   * kept while spawns are in flight, so it stays small.
   */
  readonly #unclaimed = new Map<number, { output: [OutputStream, Uint8Array][]; exit?: [number | null, string | null] }>();
  #disposed = false;
  /** Spawns and sandbox starts of this VM, paced so that one VM cannot monopolise the server's event loop. */
  readonly #spawnPace: SpawnPacer;
  readonly #startPace: SpawnPacer;

  constructor(options: ProcessTableOptions) {
    this.#options = options;
    this.#spawnPace = new SpawnPacer({ ...SPAWN_PACE, what: `spawns of VM ${options.vmName}` });
    this.#startPace = new SpawnPacer({ ...SANDBOX_START_PACE, what: `sandbox starts of VM ${options.vmName}` });
  }

  get running(): number {
    let count = 0;
    for (const entry of this.#entries.values()) if (entry.info.running) count++;
    return count;
  }

  /** The running sandbox, if one was started (vmFetch does not start one: nothing could listen). */
  get sandbox(): Promise<VmSandbox> | undefined {
    return this.#sandbox;
  }

  /**
   * The running programs that may still be starting up, each with how long a connection to a
   * closed port may wait for it: STARTUP_GRACE_MS after its spawn, or longer (extendGrace).
   * init does the waiting (see ListenWait), and stops waiting for one once it exits.
   */
  listenWaits(now = Date.now()): ListenWait[] {
    const waits: ListenWait[] = [];
    for (const entry of this.#entries.values()) {
      if (entry.info.running && entry.graceUntil > now) waits.push({ pid: entry.info.pid, ms: entry.graceUntil - now });
    }
    return waits;
  }

  /** Lets connections wait up to `ms` from now for this running program to listen (restarted dev servers); never shortens. */
  extendGrace(pid: number, ms: number): void {
    const entry = this.#running(pid);
    if (entry) entry.graceUntil = Math.max(entry.graceUntil, Date.now() + ms);
  }

  /** Starts a program (validating what the API passed); `terminal` (already validated) runs it on a pseudo-terminal. */
  async spawn(command: unknown, args: unknown = [], options: unknown = {}, terminal?: TerminalSize): Promise<{ pid: number }> {
    const name = expectString("command", command, { nonEmpty: true, max: 4096 });
    const argv = expectStringArray("args", args);
    const opts = expectObject("options", options ?? {});
    expectKnownKeys("options", opts, ["cwd", "env"]);
    const cwdOption = opts.cwd === undefined ? GUEST_HOME : expectString("options.cwd", opts.cwd, { nonEmpty: true, max: 4096 });
    const cwd = cwdOption.startsWith("/") ? cwdOption : `${GUEST_HOME}/${cwdOption}`;
    const own = opts.env === undefined ? {} : expectStringRecord("options.env", opts.env);
    const env = { ...this.#options.env, ...own };
    // A program's NODE_OPTIONS adds to the VM's (which loads the Node preload) instead of replacing it.
    if (own.NODE_OPTIONS !== undefined && this.#options.env.NODE_OPTIONS) env.NODE_OPTIONS = `${this.#options.env.NODE_OPTIONS} ${own.NODE_OPTIONS}`;
    if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed`);
    // Counted before the first await, so concurrent spawns cannot all pass the cap.
    if (this.running + this.#starting >= this.#options.maxProcesses) {
      throw new AgentVmError("EAGAIN", `spawn: VM ${this.#options.vmName} already runs ${this.#options.maxProcesses} processes (limits.maxProcesses); wait for one to exit or kill one`);
    }
    this.#starting++;
    let pid: number;
    try {
      await this.#spawnPace.take();
      if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed`);
      const sandbox = await this.#ensureSandbox();
      pid = await sandbox.spawn(name, argv, cwd, env, terminal);
    } catch (error) {
      if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed while ${name} was starting`, { cause: error });
      throw error;
    } finally {
      this.#starting--;
    }
    if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `spawn: VM ${this.#options.vmName} was disposed while ${name} was starting`);
    const info: ProcessInfo = { pid, ppid: 0, command: name, args: argv, cwd, running: true, exitCode: null, signal: null, startedAt: Date.now(), ...(terminal ? { terminal: true as const } : {}) };
    const unclaimed = this.#unclaimed.get(pid);
    this.#unclaimed.delete(pid);
    const entry: Entry = { info: { ...info, logDropped: false }, graceUntil: info.startedAt + STARTUP_GRACE_MS, exited: Promise.withResolvers<number>(), early: unclaimed?.output ?? [], log: [], logSize: 0 };
    this.#entries.set(pid, entry);
    if (unclaimed?.exit) this.exited(pid, ...unclaimed.exit);
    // The caller subscribes to output when spawn() resolves; setImmediate runs after its continuation.
    setImmediate(() => {
      const early = entry.early ?? [];
      entry.early = undefined;
      for (const [stream, data] of early) this.#deliver(entry, stream, data);
      // An exit that came with the early output is reported after it, waiters included.
      if (!entry.info.running) {
        entry.exited.resolve(entry.info.exitCode!);
        this.#options.onExit(pid, entry.info.exitCode!, entry.info.signal);
      }
    });
    this.#trimExited();
    return { pid };
  }

  async wait(pid: unknown): Promise<number> {
    return this.#get(pid, "waitProcess").exited.promise;
  }

  /**
   * The processes the API started (exited ones too, the most recent 200), and
   * every other process running in the VM — what they started themselves — as
   * `ps` inside sees it. API-started ones have ppid 0.
   */
  async list(): Promise<ProcessInfo[]> {
    const started = [...this.#entries.values()].map(({ info }) => ({ ...info, args: [...info.args] }));
    const sandbox = await this.#sandbox?.catch(() => undefined);
    const running = sandbox?.running ? await sandbox.processes().catch(() => []) : [];
    // What the guest started has command lines of the guest's choosing: cut to bounds.
    const budget = new CommandLineBudget();
    const others: ProcessInfo[] = running
      .filter((process) => !this.#entries.has(process.pid))
      .map(({ pid, ppid, argv, cwd, startedAt }) => {
        const { truncated, ...commandLine } = budget.bound(argv, cwd);
        return { pid, ppid, ...commandLine, running: true, exitCode: null, signal: null, startedAt, ...(truncated ? { truncated } : {}) };
      });
    return [...started, ...others].sort((a, b) => a.pid - b.pid);
  }

  async kill(pid: unknown, signal: unknown = "SIGTERM"): Promise<void> {
    const entry = this.#get(pid, "killProcess");
    const name = typeof signal === "number" ? Object.keys(SIGNALS).find((key) => SIGNALS[key] === signal) : signal;
    if (typeof name !== "string" || !(name in SIGNALS)) {
      throw new AgentVmError("INVALID_ARGUMENT", `killProcess: unknown signal ${String(signal)}; use one of ${Object.keys(SIGNALS).join(", ")}`);
    }
    if (!entry.info.running) return;
    (await this.#sandbox)?.signal(entry.info.pid, name);
  }

  async writeStdin(pid: unknown, data: Uint8Array): Promise<void> {
    const entry = this.#get(pid, "writeProcessStdin");
    if (!entry.info.running) throw new AgentVmError("EPIPE", `writeProcessStdin: process ${entry.info.pid} has exited`);
    await (await this.#sandbox)!.writeStdin(entry.info.pid, data);
  }

  /** A new window size for a program started on a terminal (nothing for one that has exited). */
  resize(pid: unknown, size: TerminalSize): void {
    const entry = this.#get(pid, "resizeTerminal");
    if (!entry.info.terminal) throw new AgentVmError("INVALID_ARGUMENT", `resizeTerminal: process ${entry.info.pid} does not run on a terminal (start it with openTerminal)`);
    if (entry.info.running) void this.#sandbox?.then((sandbox) => sandbox.resize(entry.info.pid, size));
  }

  closeStdin(pid: unknown): void {
    const entry = this.#get(pid, "closeProcessStdin");
    if (entry.info.running) void this.#sandbox?.then((sandbox) => sandbox.endStdin(entry.info.pid));
  }

  /** Called by the sandbox's events. */
  output(pid: number, stream: OutputStream, data: Uint8Array): void {
    const entry = this.#running(pid);
    if (!entry) return void this.#unclaimedFor(pid)?.output.push([stream, data]);
    if (entry.early) entry.early.push([stream, data]);
    else this.#deliver(entry, stream, data);
  }

  /**
   * A process's logged output: chunks after position `since` (exclusive), or
   * the last `tail` bytes' worth of chunks. `dropped` says older output is gone.
   */
  logs(pid: unknown, options: { since?: number; tail?: number } = {}): { pid: number; dropped: boolean; output: LoggedOutput[] } {
    const entry = this.#get(pid, "getProcessLogs");
    let output = entry.log.filter((chunk) => options.since === undefined || chunk.seq > options.since);
    if (options.tail !== undefined) {
      let bytes = 0;
      let first = output.length;
      while (first > 0 && bytes + output[first - 1]!.data.byteLength <= options.tail) bytes += output[--first]!.data.byteLength;
      output = output.slice(first);
    }
    return { pid: entry.info.pid, dropped: entry.info.logDropped ?? false, output };
  }

  /** Every logged chunk of the VM after position `since`, in order: what a subscriber missed. */
  outputSince(since: number): LoggedOutput[] {
    const all: LoggedOutput[] = [];
    for (const entry of this.#entries.values()) for (const chunk of entry.log) if (chunk.seq > since) all.push(chunk);
    return all.sort((a, b) => a.seq - b.seq);
  }

  /** The position of the newest output (0 before any). */
  get outputPosition(): number {
    return this.#seq;
  }

  #deliver(entry: Entry, stream: OutputStream, data: Uint8Array): void {
    const seq = ++this.#seq;
    // A chunk larger than the whole log keeps its end, as the log would.
    const limit = this.#options.logBytes;
    const kept = data.byteLength > limit ? data.subarray(data.byteLength - limit) : data;
    if (kept !== data) entry.info.logDropped = true;
    entry.log.push({ seq, pid: entry.info.pid, stream, data: kept });
    entry.logSize += kept.byteLength;
    while (entry.logSize > this.#options.logBytes && entry.log.length > 0) {
      entry.logSize -= entry.log.shift()!.data.byteLength;
      entry.info.logDropped = true;
    }
    this.#options.onOutput(entry.info.pid, stream, data, seq);
  }

  exited(pid: number, code: number | null, signal: string | null): void {
    const entry = this.#running(pid);
    if (!entry) {
      const unclaimed = this.#unclaimedFor(pid);
      if (unclaimed) unclaimed.exit = [code, signal];
      return;
    }
    // Any signal may end a program (SIGSEGV, SIGPIPE, SIGWINCH…), not only those the API sends.
    const number = signal ? (SIGNALS[signal] ?? (osConstants.signals as Record<string, number | undefined>)[signal] ?? 0) : 0;
    this.#finish(entry, code ?? 128 + number, signal);
  }

  /** The sandbox ended under the processes (init died, or the VM was stopped): each is reported killed. */
  sandboxEnded(): void {
    this.#sandbox = undefined;
    for (const entry of this.#entries.values()) if (entry.info.running) this.#finish(entry, 128 + SIGNALS.SIGKILL!, "SIGKILL");
  }

  async dispose(): Promise<void> {
    this.#disposed = true;
    const sandbox = this.#sandbox;
    this.#sandbox = undefined;
    if (sandbox) await (await sandbox.catch(() => undefined))?.stop();
    this.sandboxEnded();
  }

  #finish(entry: Entry, exitCode: number, signal: string | null): void {
    entry.info.running = false;
    entry.info.exitCode = exitCode;
    entry.info.signal = signal;
    if (entry.early) return; // reported with its early output, see spawn()
    entry.exited.resolve(exitCode);
    this.#options.onExit(entry.info.pid, exitCode, signal);
  }

  /**
   * The running entry an event from init is for. An exited entry with that pid is an earlier
   * process: pids are reused, above all by the next sandbox, whose pid namespace starts afresh.
   * Its events then belong to a spawn whose reply is still on its way (see #unclaimed).
   */
  #running(pid: number): Entry | undefined {
    const entry = this.#entries.get(pid);
    return entry?.info.running ? entry : undefined;
  }

  #unclaimedFor(pid: number) {
    if (this.#starting === 0) return undefined;
    let unclaimed = this.#unclaimed.get(pid);
    if (!unclaimed) this.#unclaimed.set(pid, (unclaimed = { output: [] }));
    return unclaimed;
  }

  /** The VM's sandbox, started if it is not running (watches need init). */
  ensureSandbox(): Promise<VmSandbox> {
    if (this.#disposed) return Promise.reject(new AgentVmError("VM_DISPOSED", `VM ${this.#options.vmName} was disposed`));
    return this.#ensureSandbox();
  }

  #ensureSandbox(): Promise<VmSandbox> {
    if (!this.#sandbox) {
      const starting = this.#startPace.take().then(() => {
        if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `VM ${this.#options.vmName} was disposed`);
        return this.#options.startSandbox();
      });
      this.#sandbox = starting;
      // A sandbox that failed to start is not kept: the next spawn tries again.
      starting.catch(() => {
        if (this.#sandbox === starting) this.#sandbox = undefined;
      });
    }
    return this.#sandbox;
  }

  #get(pid: unknown, operation: string): Entry {
    const entry = typeof pid === "number" ? this.#entries.get(pid) : undefined;
    if (!entry) {
      if (typeof pid !== "number" || !Number.isInteger(pid)) {
        throw new AgentVmError("INVALID_ARGUMENT", `${operation}: pid must be an integer, got ${JSON.stringify(pid)}`);
      }
      throw new AgentVmError("ESRCH", `${operation}: no process ${pid} in VM ${this.#options.vmName}; listProcesses() shows the pids`);
    }
    return entry;
  }

  #trimExited(): void {
    if (this.#entries.size <= EXITED_KEPT) return;
    for (const [pid, entry] of this.#entries) {
      if (this.#entries.size <= EXITED_KEPT) break;
      if (!entry.info.running) this.#entries.delete(pid);
    }
  }
}
