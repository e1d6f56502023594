/**
 * Child processes in a guest. A VM runs Node.js programs only, so
 * `spawn("node", …)` (and exec/execFile/fork of node) asks the kernel to start a
 * sibling in the same VM — sandboxed exactly like its parent — with its stdio
 * joined to the parent through kernel streams. Any other command fails the way
 * a missing binary does (ENOENT), with a message that says why. Synchronous
 * variants cannot wait on the kernel and fail with ENOTSUP.
 */
import childProcess from "node:child_process";
import { EventEmitter } from "node:events";
import { promisify } from "node:util";
import type { Readable, Writable } from "node:stream";
import { systemError, type KernelClient } from "./kernel-client.ts";
import { kernelReadable, kernelWritable } from "./kernel-stream.ts";

const NODE_NAMES = new Set(["node", "nodejs", "/opt/node/bin/node", process.execPath]);

type StdioSetting = "pipe" | "ignore" | "inherit";

interface SpawnOptions {
  cwd?: string | URL;
  env?: Record<string, string | undefined>;
  stdio?: string | (string | number | null | undefined)[];
  shell?: boolean | string;
  signal?: AbortSignal;
}

const SIGNAL_NUMBERS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGUSR1: 10, SIGUSR2: 12, SIGTERM: 15 };

/** The parent's handle on a kernel-spawned child; the subset of ChildProcess programs use. */
class KernelChildProcess extends EventEmitter {
  pid: number | undefined;
  stdin: Writable | null = null;
  stdout: Readable | null = null;
  stderr: Readable | null = null;
  stdio: (Readable | Writable | null)[] = [null, null, null];
  exitCode: number | null = null;
  signalCode: string | null = null;
  killed = false;
  connected = false;
  spawnfile: string;
  spawnargs: string[];
  readonly #kernel: KernelClient;
  #refed = true;
  #exited = false;

  constructor(kernel: KernelClient, file: string, args: string[]) {
    super();
    this.#kernel = kernel;
    this.spawnfile = file;
    this.spawnargs = [file, ...args];
    kernel.ref();
  }

  kill(signal: string | number = "SIGTERM"): boolean {
    if (this.pid === undefined || this.#exited) return false;
    const name = typeof signal === "number" ? (Object.keys(SIGNAL_NUMBERS).find((key) => SIGNAL_NUMBERS[key] === signal) ?? "SIGTERM") : signal;
    void this.#kernel.call("kill", { pid: this.pid, signal: name }).catch(() => {});
    this.killed = true;
    return true;
  }

  send(): boolean {
    const error = new Error("child processes in a VM have no IPC channel; talk to them over stdio or a loopback port") as Error & { code: string };
    error.code = "ERR_IPC_CHANNEL_CLOSED";
    throw error;
  }

  disconnect(): void {}

  ref(): void {
    if (!this.#refed && !this.#exited) this.#kernel.ref();
    this.#refed = true;
  }

  unref(): void {
    if (this.#refed && !this.#exited) this.#kernel.unref();
    this.#refed = false;
  }

  /** The kernel reported the exit; 'close' follows once stdio has ended, as in Node. */
  exited(exitCode: number, signal: string | null): void {
    if (this.#exited) return;
    this.#exited = true;
    if (this.#refed) this.#kernel.unref();
    this.exitCode = signal ? null : exitCode;
    this.signalCode = signal;
    this.emit("exit", this.exitCode, this.signalCode);
    const open = [this.stdout, this.stderr].filter((stream): stream is Readable => stream !== null && !stream.readableEnded);
    let remaining = open.length;
    const close = () => this.emit("close", this.exitCode, this.signalCode);
    if (remaining === 0) process.nextTick(close);
    for (const stream of open) {
      stream.once("close", () => {
        if (--remaining === 0) close();
      });
      stream.once("end", () => stream.destroy());
      // Like Node's flushStdio: output nobody listens to is drained, so it ends and 'close' can follow.
      if (stream.listenerCount("data") === 0 && stream.listenerCount("readable") === 0) stream.resume();
    }
  }

  failed(error: Error): void {
    this.#exited = true;
    if (this.#refed) this.#kernel.unref();
    this.emit("error", error);
    this.emit("close", -2, null);
  }
}

function stdioSettings(stdio: SpawnOptions["stdio"]): StdioSetting[] {
  const list = typeof stdio === "string" || stdio === undefined ? [stdio ?? "pipe", stdio ?? "pipe", stdio ?? "pipe"] : stdio;
  return [0, 1, 2].map((index) => {
    const value = list[index];
    if (value === "ignore" || value === "inherit") return value;
    if (value === index) return "inherit";
    return "pipe";
  });
}

function notAvailable(command: string, syscall: string): NodeJS.ErrnoException {
  return systemError(
    { code: "ENOENT", message: `${command} is not available in the VM: it runs Node.js programs only — spawn("node", [script])` },
    syscall,
    { address: command },
  );
}

export function installChildProcessPatch(kernel: KernelClient): void {
  const children = new Map<number, KernelChildProcess>();
  kernel.onEvent("exit", (event) => {
    const child = children.get(Number(event.pid));
    if (!child) return;
    children.delete(Number(event.pid));
    child.exited(Number(event.exitCode), (event.signal as string | null) ?? null);
  });

  function spawn(command: string, argsOrOptions?: unknown, maybeOptions?: unknown): KernelChildProcess {
    let args = Array.isArray(argsOrOptions) ? (argsOrOptions as unknown[]).map(String) : [];
    const options = ((Array.isArray(argsOrOptions) ? maybeOptions : argsOrOptions) ?? {}) as SpawnOptions;
    let file = String(command);
    if (options.shell) {
      // No shell in a VM: accept a plain "node script.js args" line, nothing fancier.
      const words = [file, ...args].join(" ").trim().split(/\s+/);
      file = words[0] ?? "";
      args = words.slice(1);
    }
    const child = new KernelChildProcess(kernel, file, args);
    if (!NODE_NAMES.has(file)) {
      process.nextTick(() => child.failed(notAvailable(file, `spawn ${file}`)));
      return child;
    }
    const stdio = stdioSettings(options.stdio);
    const env = Object.fromEntries(Object.entries(options.env ?? process.env).filter((entry): entry is [string, string] => typeof entry[1] === "string"));
    const cwd = options.cwd === undefined ? process.cwd() : String(options.cwd instanceof URL ? options.cwd.pathname : options.cwd);
    // Node hands out child.stdin/stdout/stderr synchronously; they attach once the kernel answers.
    const stdin = stdio[0] === "pipe" ? kernelWritable(kernel) : undefined;
    const stdout = stdio[1] === "pipe" ? kernelReadable(kernel) : undefined;
    const stderr = stdio[2] === "pipe" ? kernelReadable(kernel) : undefined;
    child.stdin = stdin?.stream ?? null;
    child.stdout = stdout?.stream ?? null;
    child.stderr = stderr?.stream ?? null;
    child.stdio = [child.stdin, child.stdout, child.stderr];
    // A synchronous reply: the child's output may follow its spawn reply in the same read.
    kernel.request<{ pid: number; stdin: number | null; stdout: number | null; stderr: number | null }>("spawn", { command: file, args, cwd, env, stdio }, (error, reply) => {
      if (error) {
        for (const pending of [stdin, stdout, stderr]) pending?.abandon();
        child.failed(systemError(error, `spawn ${file}`, { address: file }));
        return;
      }
      child.pid = reply.pid;
      for (const [pending, id] of [[stdin, reply.stdin], [stdout, reply.stdout], [stderr, reply.stderr]] as const) {
        if (pending && id !== null) pending.attach(id);
        else pending?.abandon();
      }
      children.set(reply.pid, child);
      process.nextTick(() => child.emit("spawn"));
    });
    options.signal?.addEventListener("abort", () => child.kill("SIGTERM"), { once: true });
    return child;
  }

  function execFile(file: string, ...rest: unknown[]): KernelChildProcess {
    const callback = typeof rest.at(-1) === "function" ? (rest.pop() as (error: Error | null, stdout: string, stderr: string) => void) : undefined;
    const args = Array.isArray(rest[0]) ? (rest.shift() as string[]) : [];
    const options = (rest[0] ?? {}) as SpawnOptions & { encoding?: BufferEncoding };
    const child = spawn(file, args, { ...options, stdio: "pipe" });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout?.on("data", (chunk: Buffer) => stdout.push(chunk));
    child.stderr?.on("data", (chunk: Buffer) => stderr.push(chunk));
    let failure: Error | null = null;
    child.once("error", (error) => (failure = error));
    child.once("close", (code: number | null, signal: string | null) => {
      const out = Buffer.concat(stdout).toString(options.encoding ?? "utf8");
      const err = Buffer.concat(stderr).toString(options.encoding ?? "utf8");
      if (!failure && code !== 0) {
        failure = Object.assign(new Error(`Command failed: ${[file, ...args].join(" ")}\n${err}`), { code, signal, killed: child.killed });
      }
      callback?.(failure, out, err);
    });
    return child;
  }

  function exec(command: string, ...rest: unknown[]): KernelChildProcess {
    return execFile(command, [], ...(typeof rest[0] === "object" ? [{ ...(rest[0] as object), shell: true }, ...rest.slice(1)] : [{ shell: true }, ...rest]));
  }

  function fork(modulePath: string, argsOrOptions?: unknown, maybeOptions?: unknown): KernelChildProcess {
    const args = Array.isArray(argsOrOptions) ? (argsOrOptions as string[]) : [];
    const options = ((Array.isArray(argsOrOptions) ? maybeOptions : argsOrOptions) ?? {}) as SpawnOptions & { execArgv?: string[]; silent?: boolean };
    return spawn("node", [...(options.execArgv ?? []), String(modulePath), ...args], { ...options, stdio: options.silent ? "pipe" : "inherit" });
  }

  function sync(name: string) {
    return () => {
      throw systemError({ code: "ENOTSUP", message: `${name} cannot run in a VM: child processes are started by the kernel asynchronously; use the callback or promise form` }, name);
    };
  }

  // Like Node's own: promisified exec/execFile resolve to { stdout, stderr }.
  for (const run of [exec, execFile] as ((...args: unknown[]) => KernelChildProcess)[]) {
    Object.defineProperty(run, promisify.custom, {
      value: (...args: unknown[]) =>
        new Promise((resolve, reject) => {
          run(...args, (error: Error | null, stdout: string, stderr: string) => (error ? reject(Object.assign(error, { stdout, stderr })) : resolve({ stdout, stderr })));
        }),
    });
  }

  const target = childProcess as unknown as Record<string, unknown>;
  target.spawn = spawn;
  target.execFile = execFile;
  target.exec = exec;
  target.fork = fork;
  target.spawnSync = sync("spawnSync");
  target.execSync = sync("execSync");
  target.execFileSync = sync("execFileSync");
}
