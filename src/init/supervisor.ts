/**
 * init's process supervisor: starts the VM's programs as its children, relays
 * their output to the server with a bounded window, feeds their stdin, signals
 * them, and reports each exit once its output has been sent.
 *
 * A program may run on a pseudo-terminal instead of pipes (`terminal`, see
 * pseudo-terminal.ts): its output is then one stream (fd 1), its stdin is the
 * terminal's input, and it can be resized.
 *
 * Every program starts through `setpriv`, which drops the capabilities init
 * keeps for its own set-up (binding the DNS port, the VM's port sysctls) and
 * sets no-new-privs, then execs the program: guests never hold a capability.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { resolve as resolvePath } from "node:path";
import type { IPty } from "@lydell/node-pty";
import { OUTPUT_WINDOW, SIGNALS, type TerminalSize } from "./protocol.ts";
import { startOnTerminal } from "./pseudo-terminal.ts";

const DROP_PRIVILEGES = ["--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"];
/** After a program exits, how long its pipes may stay open (a background child holding them) before the exit is reported anyway. */
const CLOSE_GRACE_MS = 50;
/** Keys typed into a terminal that init holds for its program before a write waits. */
const TERMINAL_INPUT_WINDOW = 64 * 1024;

export interface SupervisorOptions {
  /** Path of setpriv inside the VM. */
  setpriv: string;
  send(message: object, done?: () => void): void;
}

export interface SpawnRequest {
  command: string;
  args: string[];
  cwd: string;
  env: Record<string, string>;
  /** Run on a pseudo-terminal of this size instead of pipes. */
  terminal?: TerminalSize;
}

export class SpawnError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

export class Supervisor {
  readonly #options: SupervisorOptions;
  readonly #children = new Map<number, ChildProcess>();
  readonly #terminals = new Map<number, IPty>();

  constructor(options: SupervisorOptions) {
    this.#options = options;
  }

  /** Starts a program; resolves with its pid once it runs, rejects with ENOENT/EACCES/ENOTDIR naming what is wrong. */
  async spawn(request: SpawnRequest): Promise<number> {
    const file = this.#findProgram(request.command, request.env.PATH ?? "/usr/bin:/bin", request.cwd);
    checkDirectory(request.cwd);
    if (request.terminal) return this.#spawnOnTerminal(file, request, request.terminal);
    const child = spawn(this.#options.setpriv, [...DROP_PRIVILEGES, file, ...request.args], {
      cwd: request.cwd,
      env: request.env,
      argv0: request.command,
      stdio: ["pipe", "pipe", "pipe"],
    });
    return new Promise((resolve, reject) => {
      child.once("error", (error: NodeJS.ErrnoException) => reject(new SpawnError(error.code ?? "SPAWN_FAILED", `spawn ${request.command}: ${error.message}`)));
      child.once("spawn", () => {
        const pid = child.pid!;
        this.#children.set(pid, child);
        this.#relay(pid, child);
        resolve(pid);
      });
    });
  }

  /** Whether a program this supervisor started still runs (its exit not yet reported). */
  isRunning(pid: number): boolean {
    return this.#children.has(pid) || this.#terminals.has(pid);
  }

  signal(pid: number, signal: string): void {
    if (!(signal in SIGNALS) || !(this.#children.has(pid) || this.#terminals.has(pid))) return;
    try {
      process.kill(pid, signal as NodeJS.Signals);
    } catch {
      // It exited in the meantime; its exit report is on its way.
    }
  }

  writeStdin(pid: number, data: Buffer): Promise<void> {
    const terminal = this.#terminals.get(pid);
    if (terminal) {
      // node-pty's write takes bytes too (it writes to the pty's stream), though its types say string.
      terminal.write(data as unknown as string);
      // Answered once the pty has taken it (down to a window), so a program that does not read
      // its terminal makes the server stop sending instead of growing init. `_socket` is
      // node-pty's stream on the pty; without it, the write is answered at once.
      const stream = (terminal as unknown as { _socket?: import("node:net").Socket })._socket;
      if (!stream || stream.writableLength <= TERMINAL_INPUT_WINDOW) return Promise.resolve();
      return new Promise((resolve) => {
        stream.once("drain", resolve);
        stream.once("close", resolve);
      });
    }
    const stdin = this.#children.get(pid)?.stdin;
    if (!stdin || stdin.writableEnded || stdin.destroyed) return Promise.reject(new SpawnError("EPIPE", `process ${pid} has no open stdin`));
    return new Promise((resolve, reject) => stdin.write(data, (error) => (error ? reject(new SpawnError("EPIPE", `stdin of process ${pid}: ${error.message}`)) : resolve())));
  }

  /** A terminal has no end of input short of hanging up; for one this does nothing (send Ctrl-D, or kill it). */
  endStdin(pid: number): void {
    this.#children.get(pid)?.stdin?.end();
  }

  resize(pid: number, size: TerminalSize): void {
    try {
      this.#terminals.get(pid)?.resize(size.cols, size.rows);
    } catch {
      // Its pty closed in the meantime; its exit report is on its way.
    }
  }

  #spawnOnTerminal(file: string, request: SpawnRequest, size: TerminalSize): Promise<number> {
    let terminal: IPty;
    try {
      terminal = startOnTerminal({ file: this.#options.setpriv, args: [...DROP_PRIVILEGES, file, ...request.args], cwd: request.cwd, env: request.env, ...size });
    } catch (error) {
      return Promise.reject(new SpawnError("SPAWN_FAILED", `spawn ${request.command} on a terminal: ${(error as Error).message}`));
    }
    const pid = terminal.pid;
    this.#terminals.set(pid, terminal);
    // The same window as for pipes: above it the pty is not read, so the program blocks on write.
    let inFlight = 0;
    terminal.onData((chunk) => {
      const bytes = chunk as unknown as Buffer;
      inFlight += bytes.length;
      if (inFlight > OUTPUT_WINDOW) terminal.pause();
      this.#options.send({ t: "output", pid, fd: 1, data: bytes.toString("base64") }, () => {
        inFlight -= bytes.length;
        if (inFlight <= OUTPUT_WINDOW / 2) terminal.resume();
      });
    });
    // node-pty reports the exit once the pty's output is drained (or 200 ms after, if a background child holds it).
    terminal.onExit(({ exitCode, signal }) => {
      this.#terminals.delete(pid);
      const name = signal ? (Object.entries(osConstants.signals).find(([, number]) => number === signal)?.[0] ?? `SIG${signal}`) : null;
      this.#options.send({ t: "exit", pid, code: name ? null : exitCode, signal: name });
    });
    return Promise.resolve(pid);
  }

  #relay(pid: number, child: ChildProcess): void {
    // Output in flight (sent, not yet flushed to the channel): above the window both
    // pipes pause, so a chatty program waits for the server instead of growing init.
    let inFlight = 0;
    const pipes = [child.stdout!, child.stderr!];
    for (const [index, pipe] of pipes.entries()) {
      const fd = (index + 1) as 1 | 2;
      pipe.on("data", (chunk: Buffer) => {
        inFlight += chunk.length;
        if (inFlight > OUTPUT_WINDOW) for (const each of pipes) each.pause();
        this.#options.send({ t: "output", pid, fd, data: chunk.toString("base64") }, () => {
          inFlight -= chunk.length;
          if (inFlight <= OUTPUT_WINDOW / 2) for (const each of pipes) each.resume();
        });
      });
    }
    child.stdin!.on("error", () => {}); // EPIPE from a program that closed its stdin: reported per write.
    let closed = false;
    child.once("close", () => (closed = true));
    child.once("exit", (code, signal) => {
      const report = () => {
        this.#children.delete(pid);
        this.#options.send({ t: "exit", pid, code, signal });
      };
      if (closed) return report();
      const timer = setTimeout(report, CLOSE_GRACE_MS);
      child.once("close", () => {
        clearTimeout(timer);
        report();
      });
    });
  }

  /** PATH lookup as execvp does it, so a missing program is ENOENT naming it, not setpriv's exit code. */
  #findProgram(command: string, path: string, cwd: string): string {
    const candidates = command.includes("/") ? [command] : path.split(":").filter(Boolean).map((dir) => `${dir}/${command}`);
    for (const candidate of candidates) {
      // Relative names (./run.sh, node_modules/.bin/x, a relative PATH entry) are checked in the
      // program's cwd, where it is started (so its argv[0] stays as given), not in init's.
      const where = resolvePath(cwd, candidate);
      try {
        accessSync(where, constants.X_OK);
        if (statSync(where).isFile()) return candidate;
      } catch {
        // Not here; try the next directory.
      }
    }
    throw new SpawnError(
      "ENOENT",
      command.includes("/")
        ? `spawn ${command}: no such executable file in the VM`
        : `spawn ${command}: program not found in the VM's PATH; add it with the VM's software option (agentvm/software) or install it in the VM (npm install -g …)`,
    );
  }
}

function checkDirectory(cwd: string): void {
  let isDirectory: boolean;
  try {
    isDirectory = statSync(cwd).isDirectory();
  } catch {
    throw new SpawnError("ENOENT", `spawn: working directory ${cwd} does not exist in the VM; create it with mkdir first`);
  }
  if (!isDirectory) throw new SpawnError("ENOTDIR", `spawn: working directory ${cwd} is not a directory`);
}
