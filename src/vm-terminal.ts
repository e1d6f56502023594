/**
 * An interactive terminal on a VM (Vm.openTerminal): a program running on a
 * pseudo-terminal inside the VM, with its input, output, window size, signals
 * and exit. It is a process of the VM like any other (listProcesses shows it
 * with `terminal: true`, it counts toward limits.maxProcesses, and it keeps a
 * server's VM awake while it runs); this object is its handle.
 */
import { AgentVmError } from "./errors.ts";
import { TERMINAL_SIZE_RANGE, type TerminalSize } from "./init/protocol.ts";
import { describe, expectInteger, expectKnownKeys, expectObject, expectString, expectStringArray, expectStringRecord } from "./validate.ts";

export interface OpenTerminalOptions {
  /** The program (default "bash"); looked up in the VM's PATH. */
  command?: string;
  args?: string[];
  /** Window size in character cells, each 1 to 1000 (default 80 × 24). */
  cols?: number;
  rows?: number;
  /** Working directory (default /home/agentos). */
  cwd?: string;
  /** Added to the VM's environment; TERM is xterm-256color unless set here. */
  env?: Record<string, string>;
}

export interface TerminalExit {
  /** The exit code, or 128 + the signal's number when a signal ended it. */
  exitCode: number;
  /** The signal that ended it, e.g. "SIGHUP", or null. */
  signal: string | null;
}

/** What the terminal needs from its VM (Vm wires these to its process table and events). */
export interface TerminalHost {
  write(pid: number, data: string | Uint8Array): Promise<void>;
  resize(pid: number, size: TerminalSize): void;
  kill(pid: number, signal: string): Promise<void>;
  subscribe(pid: number, onData: (data: Uint8Array) => void, onExit: (exit: TerminalExit) => void): () => void;
}

export const DEFAULT_TERMINAL_SIZE: TerminalSize = { cols: 80, rows: 24 };
/** Output kept for a terminal before anyone listens with onData (the process's log keeps it too, see getProcessLogs). */
const EARLY_OUTPUT_BYTES = 1 << 20;
const HANGUP_REPEAT_MS = 200;

/** Validated openTerminal options, with defaults filled in. */
export function parseTerminalOptions(options: unknown): { command: string; args: string[]; size: TerminalSize; cwd: string | undefined; env: Record<string, string> } {
  const opts = expectObject("options", options ?? {});
  expectKnownKeys("options", opts, ["command", "args", "cols", "rows", "cwd", "env"]);
  return {
    command: opts.command === undefined ? "bash" : expectString("options.command", opts.command, { nonEmpty: true, max: 4096 }),
    args: opts.args === undefined ? [] : expectStringArray("options.args", opts.args),
    size: parseTerminalSize("openTerminal", opts.cols ?? DEFAULT_TERMINAL_SIZE.cols, opts.rows ?? DEFAULT_TERMINAL_SIZE.rows),
    cwd: opts.cwd === undefined ? undefined : expectString("options.cwd", opts.cwd, { nonEmpty: true, max: 4096 }),
    env: { TERM: "xterm-256color", ...(opts.env === undefined ? {} : expectStringRecord("options.env", opts.env)) },
  };
}

export function parseTerminalSize(operation: string, cols: unknown, rows: unknown): TerminalSize {
  const { min, max } = TERMINAL_SIZE_RANGE;
  for (const [name, value] of [["cols", cols], ["rows", rows]] as const) {
    if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
      throw new AgentVmError("INVALID_ARGUMENT", `${operation}: ${name} must be an integer from ${min} to ${max}, got ${describe(value)}`);
    }
  }
  return { cols: cols as number, rows: rows as number };
}

export class VmTerminal {
  readonly pid: number;
  /** Settles when the program exits (or the VM ends under it). */
  readonly exited: Promise<TerminalExit>;
  readonly #host: TerminalHost;
  #size: TerminalSize;
  readonly #dataListeners = new Set<(data: Uint8Array) => void>();
  readonly #exitListeners = new Set<(exit: TerminalExit) => void>();
  /** Output that came before the first onData listener. */
  #early: Uint8Array[] | undefined = [];
  #earlyBytes = 0;
  #exit: TerminalExit | undefined;

  /** Use Vm.openTerminal(). */
  constructor(pid: number, size: TerminalSize, host: TerminalHost) {
    this.pid = pid;
    this.#size = size;
    this.#host = host;
    const { promise, resolve } = Promise.withResolvers<TerminalExit>();
    this.exited = promise;
    const unsubscribe = host.subscribe(
      pid,
      (data) => {
        if (this.#early) {
          if (this.#earlyBytes + data.byteLength <= EARLY_OUTPUT_BYTES) this.#early.push(data);
          this.#earlyBytes += data.byteLength;
          return;
        }
        for (const listener of this.#dataListeners) listener(data);
      },
      (exit) => {
        unsubscribe();
        this.#exit = exit;
        resolve(exit);
        for (const listener of this.#exitListeners) listener(exit);
      },
    );
  }

  get cols(): number {
    return this.#size.cols;
  }
  get rows(): number {
    return this.#size.rows;
  }
  get running(): boolean {
    return this.#exit === undefined;
  }

  /** Types into the terminal: keys as text ("ls\r", "\x03" for Ctrl-C) or bytes. */
  async write(data: string | Uint8Array): Promise<void> {
    if (this.#exit) throw new AgentVmError("EPIPE", `terminal ${this.pid} has exited (code ${this.#exit.exitCode})`);
    return this.#host.write(this.pid, data);
  }

  /** A new window size (each 1 to 1000); the program gets SIGWINCH. */
  resize(cols: number, rows: number): void {
    this.#size = parseTerminalSize("resize", cols, rows);
    if (!this.#exit) this.#host.resize(this.pid, this.#size);
  }

  /** Signals the program (default SIGHUP, as closing a terminal window does). */
  async kill(signal: string = "SIGHUP"): Promise<void> {
    if (this.#exit) return;
    expectString("signal", signal, { nonEmpty: true });
    return this.#host.kill(this.pid, signal);
  }

  /** Output as it comes; the first listener also gets what was printed before it. Returns an unsubscribe function. */
  onData(listener: (data: Uint8Array) => void): () => void {
    this.#dataListeners.add(listener);
    const early = this.#early;
    if (early) {
      this.#early = undefined;
      for (const data of early) listener(data);
    }
    return () => this.#dataListeners.delete(listener);
  }

  /** Called once when the program exits (at once if it has). Returns an unsubscribe function. */
  onExit(listener: (exit: TerminalExit) => void): () => void {
    if (this.#exit) {
      const exit = this.#exit;
      queueMicrotask(() => listener(exit));
      return () => {};
    }
    this.#exitListeners.add(listener);
    return () => this.#exitListeners.delete(listener);
  }

  /** Hangs up (SIGHUP) and resolves with the exit; a program that ignores the hang-up is killed after `graceMs`. */
  async close(graceMs = 2000): Promise<TerminalExit> {
    expectInteger("graceMs", graceMs, 0, 60_000);
    if (this.#exit) return this.#exit;
    const hangUp = () => void this.kill("SIGHUP").catch(() => {});
    hangUp();
    // Again while it runs: bash that is still starting up loses a SIGHUP (it sets its handlers up then).
    const again = setInterval(hangUp, HANGUP_REPEAT_MS);
    const timer = setTimeout(() => void this.kill("SIGKILL").catch(() => {}), graceMs);
    try {
      return await this.exited;
    } finally {
      clearInterval(again);
      clearTimeout(timer);
    }
  }
}
