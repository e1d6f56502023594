/**
 * One VM's sandbox, host side: starts bubblewrap with init inside, waits for
 * init to report ready, and offers what init does (spawn, signal, stdin,
 * connect to a VM port) as promises. Events (output, exit, egress requests)
 * go to the callbacks given at start.
 *
 * Owns: the bubblewrap process and the control channel. When either ends, the
 * whole sandbox is gone (init is its first program; the PID namespace dies with
 * it) and every waiting request fails with SANDBOX_EXITED.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { constants, existsSync } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import type { Socket } from "node:net";
import type { Readable } from "node:stream";
import { AgentVmError, isErrorCode } from "../errors.ts";
import type { FromInit, ListenWait, TerminalSize, VmProcess, WatchEvent } from "../init/protocol.ts";
import { bubblewrapArgs, INIT_DIR, prepareMountPoints, type SandboxLayout } from "./bubblewrap.ts";
import type { VmCgroup } from "./cgroup.ts";
import type { GuestIdentity } from "./guest-identity.ts";
import { ControlChannel } from "./control-channel.ts";
import { seccompProgram, seccompSupported } from "./seccomp.ts";

export interface SandboxEvents {
  onOutput(pid: number, fd: 1 | 2, data: Buffer): void;
  onExit(pid: number, code: number | null, signal: string | null): void;
  /** init asks for an outbound connection; resolve with the connected socket or reject with a typed error. */
  onEgress(host: string, port: number, via: string, pid: number | undefined): Promise<Socket>;
  onResolve(name: string, family: 4 | 6, pid: number | undefined): Promise<string[]>;
  /** The sandbox ended (init exited, crashed or broke the protocol); not called after stop(). */
  onEnded(error: AgentVmError): void;
}

export interface SandboxStart {
  bwrap: string;
  layout: SandboxLayout;
  /** Environment init starts with (PATH and the like); programs get their own from the caller. */
  env: Record<string, string>;
  init: { portRange: [number, number]; allowPrivileged: boolean };
  /** OS limits applied to every process of the VM (prlimit on bubblewrap, inherited). */
  rlimits: { dataBytes: number; openFiles: number };
  /** The VM's control groups, joined before bubblewrap starts so every process of the VM is in them. */
  cgroup: VmCgroup | undefined;
  /** The host id the VM's guests are (bubblewrap runs as it); undefined: the server's own, which is not root (guest-identity.ts). */
  identity: GuestIdentity | undefined;
  events: SandboxEvents;
}

/** Where a watch's events go; `ended` once, when init ends it or the sandbox goes. */
export interface WatchListener {
  events(batch: WatchEvent[]): void;
  ended(error: AgentVmError): void;
}

const READY_TIMEOUT_MS = 20_000;
/** bubblewrap's descriptors 0-6 are taken (stdio, IPC, args, info, seccomp); host files and directories follow. */
const FIRST_SOURCE_FD = 7;
const SETPRIV = "/usr/bin/setpriv";

export class VmSandbox {
  readonly #child: ChildProcess;
  readonly #channel: ControlChannel;
  readonly #events: SandboxEvents;
  readonly ended: Promise<void>;
  #stopping = false;
  /** Set once, by whichever comes first: init's channel closing, bubblewrap exiting, a protocol violation, stop(). */
  #ended = false;
  readonly #watches = new Map<number, WatchListener>();
  #nextWatch = 1;
  /** Resolves start() when init says it is ready. */
  #readyWaiter: (() => void) | undefined;

  /** Host pid of the sandbox's pid 1, once bubblewrap reports it. */
  readonly #sandboxPid: Promise<number | undefined>;

  private constructor(child: ChildProcess, events: SandboxEvents, sandboxPid: Promise<number | undefined>) {
    this.#child = child;
    this.#sandboxPid = sandboxPid;
    this.#events = events;
    this.#channel = new ControlChannel(child, {
      onEvent: (message) => this.#onEvent(message),
      onViolation: (reason) => this.#end(new AgentVmError("PROTOCOL_VIOLATION", `the VM's init ${reason}; the VM's processes were ended`)),
    });
    // 'exit', not 'close': programs of the VM may hold inherited pipes a moment longer.
    this.ended = new Promise((resolve) => child.once("exit", () => resolve()));
    child.once("exit", (code, signal) => this.#end(new AgentVmError("SANDBOX_EXITED", `the VM's sandbox exited (${signal ?? `code ${code}`})`)));
    child.once("disconnect", () => this.#end(new AgentVmError("SANDBOX_EXITED", "the VM's init exited; its processes were ended")));
  }

  /** Starts the sandbox and resolves once init is ready for requests. */
  static async start(options: SandboxStart): Promise<VmSandbox> {
    await prepareMountPoints(options.layout);
    const initEnv = {
      ...options.env,
      NODE_CHANNEL_FD: "3",
      NODE_CHANNEL_SERIALIZATION_MODE: "json",
      AGENTVM_INIT: JSON.stringify({ ...options.init, setpriv: SETPRIV }),
    };
    // bubblewrap reads its arguments from fd 4, so the VM's `ps` (which shows
    // bubblewrap as pid 1) sees no host path.
    const sources = new HostSources(FIRST_SOURCE_FD);
    const sandboxArgs = [...bubblewrapArgs(options.layout, (path) => sources.fd(path)), ...Object.entries(initEnv).flatMap(([key, value]) => ["--setenv", key, value])];
    const handles = await sources.open();
    const initCommand = [
      "/opt/node/bin/node",
      // init is small and long-lived: a small young generation keeps its memory low.
      "--max-semi-space-size=1",
      "--max-old-space-size=64",
      `${INIT_DIR}/main.js`,
    ];
    // The syscall filter (seccomp.ts) goes in on fd 6; bubblewrap installs it last, on init and so on everything.
    const filter = seccompSupported() ? ["--seccomp", "6"] : [];
    const command = [...joinCgroup(options.cgroup), ...hostWrappers(options.rlimits, options.identity), options.bwrap, "--args", "4", "--info-fd", "5", ...filter, "--", ...initCommand];
    let child: ChildProcess;
    try {
      child = spawn(command[0]!, command.slice(1), { stdio: ["ignore", "ignore", "pipe", "ipc", "pipe", "pipe", "pipe", ...handles.map((handle) => handle.fd)], env: {}, cwd: "/" });
    } finally {
      // The child has its copies (or never started); bubblewrap is done with them once the sandbox is set up.
      await Promise.all(handles.map((handle) => handle.close()));
    }
    const feed = (fd: number, bytes: string | Buffer) => {
      const pipe = (child.stdio as unknown as import("node:stream").Writable[])[fd]!;
      pipe.on("error", () => {}); // bubblewrap that failed to start: reported by 'exit'
      pipe.end(bytes, () => pipe.destroy());
    };
    feed(4, sandboxArgs.map((arg) => `${arg}\0`).join(""));
    if (filter.length > 0) feed(6, seccompProgram());
    else (child.stdio as unknown as import("node:stream").Writable[])[6]!.destroy();
    const sandbox = new VmSandbox(child, options.events, readChildPid((child.stdio as unknown as Readable[])[5]!));
    let log = "";
    const stderr = child.stderr as Readable;
    stderr.setEncoding("utf8");
    // Kept for the start-up error, then drained: init only writes here when it fails.
    stderr.on("data", (text: string) => {
      if (log.length < 8192) log += text;
    });
    const ready = new Promise<void>((resolve, reject) => {
      sandbox.#readyWaiter = resolve;
      child.once("error", (error) => reject(new AgentVmError("SANDBOX_UNAVAILABLE", `could not start bubblewrap: ${error.message}`)));
      child.once("exit", (code, signal) => reject(new AgentVmError("SANDBOX_EXITED", `the VM's sandbox exited while starting (${signal ?? `code ${code}`}): ${log.trim() || "no output"}`)));
    });
    const timeout = setTimeout(() => sandbox.stop(), READY_TIMEOUT_MS);
    try {
      await ready;
    } finally {
      clearTimeout(timeout);
    }
    return sandbox;
  }

  /** Starts a program; with `terminal`, on a pseudo-terminal of that size. */
  async spawn(command: string, args: string[], cwd: string, env: Record<string, string>, terminal?: TerminalSize): Promise<number> {
    const { reply } = await this.#channel.request({ t: "spawn", command, args, cwd, env, ...(terminal ? { terminal } : {}) });
    return reply.pid!;
  }

  resize(pid: number, size: TerminalSize): void {
    this.#channel.notify({ t: "resize", pid, cols: size.cols, rows: size.rows });
  }

  signal(pid: number, signal: string): void {
    this.#channel.notify({ t: "signal", pid, signal });
  }

  async writeStdin(pid: number, data: Uint8Array): Promise<void> {
    await this.#channel.request({ t: "stdin", pid, data: Buffer.from(data).toString("base64") });
  }

  endStdin(pid: number): void {
    this.#channel.notify({ t: "stdin-end", pid });
  }

  /**
   * A TCP connection to a port on the VM's loopback, opened by init and handed over. While
   * nothing listens, init waits for the programs in `wait` (see ListenWait) to open it.
   */
  async connect(port: number, wait: ListenWait[] = []): Promise<Socket> {
    const { handle } = await this.#channel.request({ t: "connect", port, ...(wait.length > 0 ? { wait } : {}) });
    if (!handle) throw new AgentVmError("PROTOCOL_VIOLATION", `the VM's init answered a connection to port ${port} without a socket`);
    return handle;
  }

  async processes(): Promise<VmProcess[]> {
    const { reply } = await this.#channel.request({ t: "ps" });
    return reply.processes ?? [];
  }

  async listeningPorts(): Promise<number[]> {
    const { reply } = await this.#channel.request({ t: "ports" });
    return reply.ports ?? [];
  }

  /**
   * Watches a guest path with inotify in the VM. Resolves once the watch is in
   * place (later changes are seen) with the function that ends it.
   */
  async watch(path: string, recursive: boolean, listener: WatchListener): Promise<() => void> {
    const watch = this.#nextWatch++;
    this.#watches.set(watch, listener);
    try {
      await this.#channel.request({ t: "watch", watch, path, recursive });
    } catch (error) {
      this.#watches.delete(watch);
      throw error;
    }
    return () => {
      if (this.#watches.delete(watch)) this.#channel.notify({ t: "unwatch", watch });
    };
  }

  get running(): boolean {
    return !this.#ended;
  }

  /** Ends every process of the VM at once and resolves when the sandbox is gone. */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#channel.close(new AgentVmError("SANDBOX_EXITED", "the VM was stopped"));
    await this.#kill();
    await this.ended;
  }

  /**
   * SIGKILL to the sandbox's pid 1: the kernel ends every process of its PID
   * namespace before pid 1 is gone, and bubblewrap exits once it is, so when
   * `ended` resolves nothing of the VM runs. Killing bubblewrap alone would
   * leave that to a parent-death signal, after `ended`.
   */
  async #kill(): Promise<void> {
    const pid = this.#child.exitCode === null && this.#child.signalCode === null ? await this.#sandboxPid : undefined;
    if (pid !== undefined && this.#child.exitCode === null && this.#child.signalCode === null) {
      try {
        process.kill(pid, "SIGKILL");
        return;
      } catch {
        // Gone already; bubblewrap is about to exit.
      }
    }
    this.#child.kill("SIGKILL");
  }

  #onEvent(message: Exclude<FromInit, { t: "reply" }>): void {
    switch (message.t) {
      case "ready":
        this.#readyWaiter?.();
        this.#readyWaiter = undefined;
        return;
      case "output":
        this.#events.onOutput(message.pid, message.fd, Buffer.from(message.data, "base64"));
        return;
      case "exit":
        this.#events.onExit(message.pid, message.code, message.signal);
        return;
      case "watch-events":
        this.#watches.get(message.watch)?.events(message.events);
        return;
      case "watch-end": {
        const listener = this.#watches.get(message.watch);
        this.#watches.delete(message.watch);
        listener?.ended(new AgentVmError(isErrorCode(message.code) ? message.code : "INTERNAL", message.message));
        return;
      }
      case "egress":
        this.#events.onEgress(message.host, message.port, message.via, message.pid).then(
          (socket) => this.#channel.notify({ t: "egress", id: message.id, ok: true }, socket),
          (error: unknown) => {
            const shaped = AgentVmError.from(error);
            this.#channel.notify({ t: "egress", id: message.id, ok: false, code: shaped.code, message: shaped.message });
          },
        );
        return;
      case "resolve":
        this.#events.onResolve(message.name, message.family, message.pid).then(
          (addresses) => this.#channel.notify({ t: "resolved", id: message.id, ok: true, addresses }),
          (error: unknown) => {
            const shaped = AgentVmError.from(error);
            this.#channel.notify({ t: "resolved", id: message.id, ok: false, code: shaped.code, message: shaped.message });
          },
        );
        return;
    }
  }

  #end(error: AgentVmError): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#channel.close(error);
    const watches = [...this.#watches.values()];
    this.#watches.clear();
    for (const listener of watches) listener.ended(error);
    void this.#kill();
    if (!this.#stopping) this.#events.onEnded(error);
  }
}

/**
 * A shell that writes its own pid into the VM's groups, then execs the rest:
 * the groups hold the sandbox from its first instruction, so nothing of the
 * VM runs outside them even for a moment.
 */
function joinCgroup(cgroup: VmCgroup | undefined): string[] {
  if (!cgroup) return [];
  const script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"';
  return ["/bin/sh", "-c", script, "agentvm-cgroup", ...cgroup.procsFiles, "--"];
}

/**
 * setpriv gives bubblewrap a parent-death signal (its --die-with-parent covers
 * what it starts, not itself), and prlimit sets limits every process of the VM
 * inherits. Both are util-linux; without them the VM still runs, with a warning.
 */
function hostWrappers(rlimits: SandboxStart["rlimits"], identity: GuestIdentity | undefined): string[] {
  const setpriv = findTool("setpriv", "VMs may outlive a server that is killed with SIGKILL");
  const prlimit = findTool("prlimit", "VM processes run without OS memory and open-file limits");
  if (identity && !setpriv) {
    throw new AgentVmError("SANDBOX_UNAVAILABLE", "setpriv (util-linux) is needed to run a VM's guests as an unprivileged host id; install util-linux");
  }
  // prlimit first, while still root (an unprivileged process could not raise a hard limit); setpriv then
  // drops to the VM's id and sets the parent-death signal after the drop, which would otherwise clear it.
  const drop = identity ? [`--reuid=${identity.uid}`, `--regid=${identity.gid}`, "--clear-groups"] : [];
  return [
    ...(prlimit ? [prlimit, `--data=${rlimits.dataBytes}`, `--nofile=${rlimits.openFiles}`, "--core=0"] : []),
    ...(setpriv ? [setpriv, ...drop, "--pdeathsig", "KILL"] : []),
  ];
}

/**
 * Host files and directories bubblewrap mounts or copies, opened by the server
 * and passed as descriptors: numbered in the order first asked for, opened
 * without following a final symlink.
 */
class HostSources {
  readonly #paths = new Map<string, number>();
  readonly #first: number;

  constructor(first: number) {
    this.#first = first;
  }

  fd(path: string): number {
    let fd = this.#paths.get(path);
    if (fd === undefined) this.#paths.set(path, (fd = this.#first + this.#paths.size));
    return fd;
  }

  async open(): Promise<FileHandle[]> {
    const handles: FileHandle[] = [];
    try {
      for (const path of this.#paths.keys()) handles.push(await open(path, constants.O_RDONLY | constants.O_NOFOLLOW));
    } catch (error) {
      await Promise.all(handles.map((handle) => handle.close()));
      throw new AgentVmError("SANDBOX_UNAVAILABLE", `a file the VM's sandbox needs could not be opened: ${(error as Error).message}`);
    }
    return handles;
  }
}

const tools = new Map<string, string | null>();
function findTool(name: string, without: string): string | null {
  if (!tools.has(name)) {
    const found = [`/usr/bin/${name}`, `/bin/${name}`].find((path) => existsSync(path)) ?? null;
    if (!found) console.warn(`agentvm: ${name} (util-linux) not found; ${without}`);
    tools.set(name, found);
  }
  return tools.get(name)!;
}

/** bubblewrap's --info-fd JSON names the sandbox's pid 1 as seen from the host. */
function readChildPid(info: Readable): Promise<number | undefined> {
  return new Promise((resolve) => {
    let text = "";
    info.setEncoding("utf8");
    info.on("data", (chunk: string) => {
      text += chunk;
      const match = /"child-pid"\s*:\s*(\d+)/.exec(text);
      // Read to the end all the same: closing early would SIGPIPE bubblewrap.
      if (match) resolve(Number(match[1]));
    });
    info.on("close", () => resolve(undefined));
    info.on("error", () => resolve(undefined));
  });
}
