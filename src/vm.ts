/**
 * The embedded API: `createVm()` returns one VM — a filesystem, a process table
 * and a socket table in this process, with guests confined in sandboxes. Method
 * names match the seed actions so the server can expose them one to one.
 */
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import { chmod, chown, mkdir, readdir, stat, writeFile } from "node:fs/promises";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { createServer as createHttpServer, type ClientRequest, type OutgoingHttpHeaders } from "node:http";
import { isIP, type Socket } from "node:net";
import { basename, join, resolve } from "node:path";
import { Readable, Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import { AgentVmError, invalidArgument } from "./errors.ts";
import { ensureImage, type VmImage } from "./image/index.ts";
import { parseSoftware, type SoftwareEntry } from "./image/software.ts";
import { normaliseGuestPath, VmFilesystem, type VmStat, type WriteOptions } from "./sandbox/filesystem.ts";
import { extractInto, packDirectory, type TarExtractResult } from "./sandbox/vm-tar.ts";
import { WatchStream, type VmWatch, type WatchOptions } from "./watch-stream.ts";
import { beginRun, endRun } from "./sandbox/interrupted-writes.ts";
import { DenialLog } from "./net/denial-log.ts";
import { autoRange, listenDenials, parseListenPolicy, type ListenConfig, type ListenPolicy } from "./policy/listen-policy.ts";
import { Egress, type Denial } from "./net/egress.ts";
import { parseNetworkPolicy, type NetworkPermission, type NetworkPolicy } from "./policy/network-policy.ts";
import { parsePreviewConfig, PreviewTokens, type PreviewConfig, type PreviewInfo, type PreviewUrl, type ResolvedPreviewConfig } from "./net/previews.ts";
import { PreviewStore } from "./store/preview-store.ts";
import { SqliteStore } from "./store/sqlite-store.ts";
import { VmFetcher, type VmFetchInit, type VmFetchResponse, type VmFetchStreamResponse } from "./net/vm-fetch.ts";
import { PreviewGateway } from "./net/gateway.ts";
import { findBubblewrap, GUEST_HOME, INIT_DIR } from "./sandbox/bubblewrap.ts";
import { initCode } from "./sandbox/init-code.ts";
import { EgressBroker } from "./sandbox/egress-broker.ts";
import { EGRESS_PORTS, MAX_LISTEN_WAIT, type ListenWait } from "./init/protocol.ts";
import { ProcessTable, type OutputStream, type ProcessInfo } from "./sandbox/process-table.ts";
import { VmSandbox } from "./sandbox/vm-sandbox.ts";
import { VmCgroup } from "./sandbox/cgroup.ts";
import { VmDisk } from "./sandbox/vm-disk.ts";
import { release, stage } from "./sandbox/staging.ts";
import { guestIdentity, type GuestIdentity } from "./sandbox/guest-identity.ts";
import { parseTerminalOptions, VmTerminal, type OpenTerminalOptions, type TerminalExit } from "./vm-terminal.ts";
import { describe, expectInteger, expectKnownKeys, expectObject, expectPort, expectString, toBytes } from "./validate.ts";

export interface VmLimits {
  /** Processes started through the API running at once (default 32). */
  maxProcesses?: number;
  /** Memory per process in MiB: Node's heap cap (NODE_OPTIONS) and, with headroom, the OS data limit (default 256). */
  memoryMb?: number;
  /** Open files per process (default 4096). */
  openFiles?: number;
  /** Memory of all the VM's processes together, tmpfs (/dev/shm, /run) and page cache included, in MiB (default 2048). */
  totalMemoryMb?: number;
  /** Processes and threads of the VM together (default 2048). */
  maxTasks?: number;
  /** The VM's CPU weight against other VMs (default 1024; 512 is half as much when CPU is scarce). */
  cpuShares?: number;
  /** Recent output each process keeps for getProcessLogs and late subscribers, in bytes (default 262144). */
  logBytes?: number;
  /** Bytes the VM's files may take on disk (default 10 GiB; fixed when the VM's disk is first made). */
  diskBytes?: number;
  /** Files, directories and links the VM may hold (default 1000000; fixed when the VM's disk is first made). */
  diskInodes?: number;
  /**
   * Outbound connections the server opens for the VM at once: from the guest's connect until
   * the connection is handed into the VM (default 64). Past it a connect is refused EACCES.
   */
  maxEgressInFlight?: number;
  /** DNS lookups the server runs for the VM at once (default 64). Past it a lookup is refused EACCES. */
  maxDnsInFlight?: number;
}

/** What a VM uses now; `caps` is false where the host gives no per-VM control groups (then only processes is known). */
export interface VmUsage {
  caps: boolean;
  memoryBytes?: number;
  memoryPeakBytes?: number;
  /** Processes the kernel killed because the VM reached totalMemoryMb (since its sandbox started). */
  oomKills?: number;
  tasks?: number;
  /** Processes started through the API running now. */
  processes: number;
  /** What the VM's files take: bytes and inodes, and whether the kernel caps them (limits.diskBytes, limits.diskInodes) or they are only measured. */
  disk: { bytes: number; inodes: number; capped: boolean };
}

export interface PermissionsConfig {
  /** "allow", "deny" (default) or { default?, rules: [{ mode, operations?, patterns? }] }: see docs/security.md. */
  network?: NetworkPermission;
}

export interface CreateVmOptions {
  /** Where VM directories live; this VM's files are under `<dataDir>/vms/<name or its hash>/root`. */
  dataDir: string;
  /** Names the VM in messages and on disk (default "default"; up to 256 printable characters). */
  name?: string;
  /** Software on top of the base image (shell, coreutils, git, curl, node, npm): entries from `agentvm/software`. */
  software?: unknown[];
  permissions?: PermissionsConfig;
  listen?: ListenConfig;
  limits?: VmLimits;
  /** Guest runtime override: path to a Node ≥ 26 binary for the image (also AGENTVM_GUEST_NODE). */
  runtime?: { node?: string };
  /** Preview URL lifetimes and caps. */
  preview?: PreviewConfig;
  /** Like /etc/hosts for the VM: name → IP address. Policy still applies to both. */
  hosts?: Record<string, string>;
}

/** Wiring a server passes to createVm (not for embedders). */
export interface VmHostServices {
  previews?: PreviewTokens;
  /** Where spawn's restartOnWake processes are recorded; only a registry server's VMs sleep and wake. */
  wakeProcesses?: WakeProcessRecords;
  /** Keeps the VM's own lifecycle bounds (setLifecycle); only a registry server's VMs have a lifecycle. */
  lifecycle?: { set(bounds: { maxLifetimeSeconds?: number | null; idleTimeoutSeconds?: number | null }): VmLifecycle };
}

/** A VM's lifecycle bounds in force: its own (setLifecycle), else its definition's; null for none. */
export interface VmLifecycle {
  maxLifetimeSeconds: number | null;
  idleTimeoutSeconds: number | null;
  /** When the VM will be destroyed (epoch ms), or null. */
  expiresAt: number | null;
}

/** The longest bound setLifecycle takes (ten years), as agentOS({ lifecycle }) does. */
const MAX_LIFECYCLE_SECONDS = 10 * 365 * 86_400;

/** The durable list of a VM's restart-on-wake processes (SQLite on a server). */
export interface WakeProcessRecords {
  add(process: { command: string; args: string[]; cwd?: string; env?: Record<string, string> }): number;
  remove(id: number): void;
}

export interface SpawnOptions {
  cwd?: string;
  env?: Record<string, string>;
  /**
   * Start this process again whenever the VM wakes after a sleep (a dev server
   * its previews show), until it is killed with killProcess. Only on a VM served
   * by a registry (an embedded VM does not sleep).
   */
  restartOnWake?: boolean;
}

export interface ProcessOutputEvent {
  pid: number;
  stream: OutputStream;
  data: Uint8Array;
  /** Its position in the VM's output (see getProcessLogs and connect({ since })). */
  seq: number;
}

export interface ProcessLogs {
  pid: number;
  /** Older output of this process fell out of its log (limits.logBytes). */
  dropped: boolean;
  output: { seq: number; stream: OutputStream; data: Uint8Array }[];
}

export interface ProcessExitEvent {
  pid: number;
  /** The exit code, or 128 + the signal's number when a signal ended it. */
  exitCode: number;
  /** The signal that ended it, e.g. "SIGKILL", or null. */
  signal: string | null;
}

export interface ExecOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** Kill the program and fail with EXEC_TIMEOUT after this long (default 600000: 10 minutes). */
  timeoutMs?: number;
  /** Kill the program and fail with EXEC_OUTPUT_LIMIT past this much stdout and stderr together (default 64 MiB). */
  maxOutputBytes?: number;
  /** Called with each chunk of stdout as it comes (before exec resolves); the result still holds all of it. */
  onStdout?: (data: Uint8Array) => void;
  /** Called with each chunk of stderr as it comes. */
  onStderr?: (data: Uint8Array) => void;
}

export interface ExecResult {
  pid: number;
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** A file opened for a streamed read (openReadStream). */
export interface FileReadStream {
  /** The bytes from `start` to `end`; destroy it to stop early (the file is closed either way). */
  stream: Readable;
  /** The whole file's size in bytes. */
  size: number;
  /** Permission bits. */
  mode: number;
  /** First and last byte offsets streamed (end is -1 for an empty file). */
  start: number;
  end: number;
}

export interface VmEvents {
  processOutput: [ProcessOutputEvent];
  processExit: [ProcessExitEvent];
}

/** Names that can be used as a directory name as they are; others are hashed. */
const SAFE_DIRECTORY = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MAX_NAME = 256;
const RECENT_DENIALS = 100;
const EXEC_TIMEOUT_MS = 600_000;
const EXEC_MAX_OUTPUT = 64 * 1024 * 1024;
const DEFAULT_LIMITS: Required<VmLimits> = { maxProcesses: 32, memoryMb: 256, openFiles: 4096, totalMemoryMb: 2048, maxTasks: 2048, cpuShares: 1024, logBytes: 256 * 1024, diskBytes: 10 * 1024 ** 3, diskInodes: 1_000_000, maxEgressInFlight: 64, maxDnsInFlight: 64 };
/**
 * RLIMIT_DATA above the heap cap, per process. Node 26 needs a fixed ~565 MiB
 * of it to boot whatever the heap cap (~590 MiB once WebAssembly loads), and
 * each worker thread reserves as much again for its own isolate; programs may
 * use workers now. It is address space, not memory: the VM's memory cap is a
 * cgroup's job.
 */
const DATA_HEADROOM_MB = 4096;
/**
 * The VM has no route out: programs reach the world through init's proxies,
 * where the server's network policy decides each destination. Both spellings,
 * because curl reads only the lowercase http_proxy. NODE_USE_ENV_PROXY stays
 * unset: the Node preload routes every Node socket through the same policy
 * itself, so a denial is EACCES on the socket rather than a proxy's 403.
 */
const EGRESS_ENV: Record<string, string> = (() => {
  const http = `http://127.0.0.1:${EGRESS_PORTS.http}`;
  const socks = `socks5h://127.0.0.1:${EGRESS_PORTS.socks5}`;
  const local = "localhost,127.0.0.1,::1";
  const env: Record<string, string> = {};
  for (const [name, value] of [["http_proxy", http], ["https_proxy", http], ["all_proxy", socks], ["no_proxy", local]]) {
    env[name!] = value!;
    env[name!.toUpperCase()] = value!;
  }
  return env;
})();
/** What the files API may not change, as in the VM: the image, the kernel's file systems, init's /run. */
const READ_ONLY = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/dev", "/sys", "/run"];

/** The files API sees what the VM sees: the image's directories and the VM's own /etc files over them. */
function imageMounts(image: VmImage, vmDir: string): Record<string, string> {
  const mounts: Record<string, string> = {};
  for (const entry of image.entries) mounts[`/${entry.name}`] = join(image.root, entry.name);
  for (const layer of image.layers) mounts[layer.mountAt] = layer.dir;
  mounts["/etc/hosts"] = join(vmDir, "etc/hosts");
  mounts["/etc/resolv.conf"] = join(vmDir, "etc/resolv.conf");
  return mounts;
}

/** init's built code (dist/init), self-contained with its one dependency. */
const INIT_CODE = fileURLToPath(new URL(import.meta.url.endsWith(".ts") ? "../dist/init/" : "./init/", import.meta.url));

export class Vm extends EventEmitter<VmEvents> {
  readonly name: string;
  readonly root: string;
  readonly listenPolicy: ListenPolicy;
  readonly #fs: VmFilesystem;
  readonly #processes: ProcessTable;
  readonly #fetcher: VmFetcher;
  readonly #egress: EgressBroker;
  readonly #denials: Denial[] = [];
  #denialCount = 0;
  readonly #denialLog: DenialLog;
  readonly #dataDir: string;
  readonly #vmDir: string;
  readonly #previewConfig: ResolvedPreviewConfig;
  #previews: PreviewTokens | undefined;
  /** Opened here only for an embedded VM's previews; a server passes its own. */
  #ownStore: SqliteStore | undefined;
  /** One PreviewStore (prepared statements) for the tokens and the gateway of an embedded VM. */
  #ownPreviewStore: PreviewStore | undefined;
  readonly #servedByRegistry: boolean;
  readonly #previewServers = new Set<() => Promise<void>>();
  /** Each running servePreviews() server's origin, in start order. */
  readonly #previewOrigins = new Map<() => Promise<void>, string>();
  #previewOrigin: string | undefined;
  /** The running (or last) sandbox's control groups, for usage(). */
  #cgroup: VmCgroup | undefined;
  readonly #disk: VmDisk;
  /** The VM's root as staged for its sandbox, once staged (released on dispose). */
  #stagedRoot: Promise<string> | undefined;
  /** Connections handed out of the VM that are still open (vmFetch, previews). */
  #openConnections = 0;
  readonly #watches = new Set<WatchStream>();
  #disposed = false;
  readonly #wakeProcesses: WakeProcessRecords | undefined;
  readonly #lifecycle: VmHostServices["lifecycle"];
  /** pid → its restart-on-wake record. */
  readonly #wakeProcessIds = new Map<number, number>();

  /** Use createVm(); the constructor expects validated options and a prepared root. */
  constructor(init: {
    name: string;
    vmDir: string;
    dataDir: string;
    listen: ListenPolicy;
    network: NetworkPolicy;
    hosts: ReadonlyMap<string, string>;
    limits: Required<VmLimits>;
    preview: ResolvedPreviewConfig;
    bwrap: string;
    image: VmImage;
    services: VmHostServices;
    disk: VmDisk;
    identity: GuestIdentity | undefined;
  }) {
    super();
    // Each exec() in flight listens for output: concurrent execs are normal, not a leak.
    this.setMaxListeners(0);
    this.name = init.name;
    this.root = join(init.vmDir, "root");
    this.#dataDir = init.dataDir;
    this.#vmDir = init.vmDir;
    this.#denialLog = new DenialLog(init.name);
    this.#previewConfig = init.preview;
    this.#previews = init.services.previews;
    this.#servedByRegistry = init.services.previews !== undefined;
    this.#wakeProcesses = init.services.wakeProcesses;
    this.#lifecycle = init.services.lifecycle;
    this.listenPolicy = init.listen;
    this.#disk = init.disk;
    this.#fs = new VmFilesystem(this.root, { readOnly: READ_ONLY, mounts: imageMounts(init.image, init.vmDir), ...(init.identity ? { owner: init.identity } : {}) });
    this.#egress = new EgressBroker(
      new Egress({
        vmName: init.name,
        policy: init.network,
        hosts: init.hosts,
        onDenied: (denial) => this.#recordDenial(denial),
        maxConnectsInFlight: init.limits.maxEgressInFlight,
        maxLookupsInFlight: init.limits.maxDnsInFlight,
      }),
    );
    const env = {
      HOME: GUEST_HOME,
      USER: "root",
      PATH: init.image.path,
      LANG: "C.UTF-8",
      TZ: "UTC",
      // npm install -g lands in the VM's home, which is writable and survives sleep.
      NPM_CONFIG_PREFIX: `${GUEST_HOME}/.local`,
      // npm 12 holds back install scripts on a workstation; in a VM the sandbox is the
      // boundary, and `npm install` runs them as users of E2B or Daytona expect.
      NPM_CONFIG_DANGEROUSLY_ALLOW_ALL_SCRIPTS: "true",
      NODE_OPTIONS: `--require ${INIT_DIR}/node-preload.cjs --max-old-space-size=${init.limits.memoryMb}`,
      ...EGRESS_ENV,
    };
    const root = this.root;
    this.#processes = new ProcessTable({
      vmName: init.name,
      maxProcesses: init.limits.maxProcesses,
      env,
      startSandbox: async () => {
        // Named by the VM's directory: VMs of the same name in other data directories never share one.
        const cgroup = await VmCgroup.create(`${basename(init.vmDir).slice(0, 40)}-${createHash("sha256").update(init.vmDir).digest("hex").slice(0, 12)}`, {
          memoryBytes: init.limits.totalMemoryMb * 1024 * 1024,
          tasks: init.limits.maxTasks,
          cpuShares: init.limits.cpuShares,
        });
        const started = VmSandbox.start({
          bwrap: init.bwrap,
          layout: {
            ...(await this.#stagedPaths(init.image, init.identity)),
            etc: { hosts: join(init.vmDir, "etc/hosts"), resolvConf: join(init.vmDir, "etc/resolv.conf") },
            guestConfig: await writeGuestConfig(init.vmDir, init.listen, init.network),
            initCode: await initCode(INIT_CODE, init.image.root, init.identity !== undefined),
          },
          identity: init.identity,
          env: { PATH: init.image.path, HOME: GUEST_HOME, TZ: "UTC" },
          init: { portRange: autoRange(init.listen), allowPrivileged: init.listen.allowPrivileged },
          rlimits: { dataBytes: (init.limits.memoryMb + DATA_HEADROOM_MB) * 1024 * 1024, openFiles: init.limits.openFiles },
          cgroup,
          events: {
            onOutput: (pid, fd, data) => this.#processes.output(pid, fd === 1 ? "stdout" : "stderr", data),
            onExit: (pid, code, signal) => this.#processes.exited(pid, code, signal),
            onEgress: async (host, port, via, pid) => (via === "udp" ? this.#egress.udp(host, port, pid) : this.#egress.open(host, port, pid)),
            onResolve: (name, family, pid) => this.#egress.resolve(name, family, pid),
            onEnded: (error) => {
              console.warn(`agentvm: VM ${init.name}: ${error.message}`);
              this.#processes.sandboxEnded();
            },
          },
        });
        this.#cgroup = cgroup;
        started.then(
          (sandbox) => {
            // Where the server, not the kernel, holds the disk caps: guests past them are stopped.
            const unwatch = this.#disk.watch((used) => {
              console.warn(`agentvm: VM ${init.name}: its files take ${used.bytes} bytes in ${used.inodes} inodes, past limits.diskBytes or limits.diskInodes; its processes were stopped`);
              void sandbox.stop().then(() => this.#processes.sandboxEnded());
            });
            void sandbox.ended.then(() => {
              unwatch();
              return cgroup?.remove();
            });
          },
          () => void cgroup?.remove(),
        );
        return started;
      },
      onOutput: (pid, stream, data, seq) => this.emit("processOutput", { pid, stream, data, seq }),
      logBytes: init.limits.logBytes,
      onExit: (pid, exitCode, signal) => this.emit("processExit", { pid, exitCode, signal }),
    });
    this.#fetcher = new VmFetcher((port, wait) => this.#connect(port, wait), init.name, () => this.#processes.listenWaits());
  }

  // Files. Methods that return a promise are async so that every failure, VM_DISPOSED
  // and bad arguments included, is a rejection rather than a synchronous throw.
  /** Writes a whole file; `mode` sets its permission bits (default 0644), `append` adds to what it holds. */
  async writeFile(path: string, content: string | Uint8Array, options?: WriteOptions): Promise<void> {
    this.#alive();
    await this.#disk.refuseIfFull(`writeFile ${path}`);
    return this.#fs.writeFile(path, toBytes("content", content), writeOptions(options));
  }
  /**
   * Streams a file out; `start`/`end` are inclusive byte offsets. Fails with
   * RANGE_NOT_SATISFIABLE when `start` is at or past the end of a non-empty file.
   */
  async openReadStream(path: string, options: { start?: number; end?: number } = {}): Promise<FileReadStream> {
    this.#alive();
    const opts = expectObject("options", options ?? {});
    expectKnownKeys("options", opts, ["start", "end"]);
    const from = opts.start === undefined ? 0 : expectInteger("options.start", opts.start, 0, Number.MAX_SAFE_INTEGER);
    const to = opts.end === undefined ? undefined : expectInteger("options.end", opts.end, 0, Number.MAX_SAFE_INTEGER);
    const { handle, size, mode } = await this.#fs.openRead(path);
    const end = Math.min(to ?? size - 1, size - 1);
    if (size === 0 || end < from) {
      await handle.close();
      if (size > 0 || from > 0) {
        throw new AgentVmError("RANGE_NOT_SATISFIABLE", `openReadStream ${path}: bytes ${from}-${to ?? ""} are not in the file (it has ${size} bytes)`);
      }
      return { stream: Readable.from([]), size, mode, start: 0, end: -1 };
    }
    return { stream: handle.createReadStream({ start: from, end, highWaterMark: 256 * 1024 }), size, mode, start: from, end };
  }
  /**
   * A file as a writable stream. Nothing appears under `path` until the stream
   * finishes (end()); destroying it leaves no trace (an append is cut back).
   */
  async openWriteStream(path: string, options?: WriteOptions): Promise<Writable> {
    this.#alive();
    await this.#disk.refuseIfFull(`openWriteStream ${path}`);
    const writer = await this.#fs.openWrite(path, writeOptions(options));
    return new Writable({
      highWaterMark: 256 * 1024,
      write(chunk: Buffer, _encoding, callback) {
        writer.write(chunk).then(() => callback(), callback);
      },
      final(callback) {
        writer.commit().then(() => callback(), callback);
      },
      destroy(error, callback) {
        writer.abort().then(() => callback(error));
      },
    });
  }
  /** A directory as a tar stream: modes, symlinks (as links), files; see sandbox/vm-tar.ts. */
  async readTar(dir: string): Promise<Readable> {
    this.#alive();
    return packDirectory(this.#fs, dir);
  }
  /** Extracts a tar stream into a directory, confined to it; see sandbox/vm-tar.ts. */
  async writeTar(dir: string, archive: AsyncIterable<Uint8Array>): Promise<TarExtractResult> {
    this.#alive();
    if (archive === null || typeof archive !== "object" || typeof (archive as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] !== "function") {
      throw invalidArgument(`writeTar: archive must be a stream of bytes (a Readable or an async iterable), got ${describe(archive)}`);
    }
    await this.#disk.refuseIfFull(`writeTar ${dir}`);
    return extractInto(this.#fs, dir, archive);
  }
  /**
   * Watches a path from inside the VM (inotify): create, modify, delete and
   * rename events with guest paths, coalesced per path over 50 ms. Resolves once
   * the watch is in place; ENOENT when the path does not exist.
   */
  async watch(path: string, options: WatchOptions = {}): Promise<VmWatch> {
    this.#alive();
    const guest = normaliseGuestPath("path", path);
    const opts = expectObject("options", options ?? {});
    expectKnownKeys("options", opts, ["recursive", "onEvent"]);
    if (opts.recursive !== undefined && typeof opts.recursive !== "boolean") throw invalidArgument(`watch: options.recursive must be a boolean, got ${describe(opts.recursive)}`);
    if (opts.onEvent !== undefined && typeof opts.onEvent !== "function") throw invalidArgument(`watch: options.onEvent must be a function, got ${describe(opts.onEvent)}`);
    const sandbox = await this.#processes.ensureSandbox();
    let unwatch: (() => void) | undefined;
    const watch = new WatchStream(guest, opts.onEvent as WatchOptions["onEvent"], () => {
      this.#watches.delete(watch);
      unwatch?.();
    });
    unwatch = await sandbox.watch(guest, opts.recursive === true, { events: (batch) => watch.push(batch), ended: (error) => watch.end(error) });
    this.#watches.add(watch);
    return watch;
  }
  async readFile(path: string): Promise<Uint8Array> {
    this.#alive();
    return this.#fs.readFile(path);
  }
  async mkdir(path: string, options?: { recursive?: boolean }): Promise<void> {
    this.#alive();
    await this.#disk.refuseIfFull(`mkdir ${path}`);
    return this.#fs.mkdir(path, options);
  }
  async readdir(path: string): Promise<string[]> {
    this.#alive();
    return this.#fs.readdir(path);
  }
  async stat(path: string): Promise<VmStat> {
    this.#alive();
    return this.#fs.stat(path);
  }
  async exists(path: string): Promise<boolean> {
    this.#alive();
    return this.#fs.exists(path);
  }
  async deleteFile(path: string, options?: { recursive?: boolean }): Promise<void> {
    this.#alive();
    return this.#fs.deleteFile(path, options);
  }
  /** Alias of deleteFile. */
  async remove(path: string, options?: { recursive?: boolean }): Promise<void> {
    return this.deleteFile(path, options);
  }
  async move(from: string, to: string): Promise<void> {
    this.#alive();
    return this.#fs.move(from, to);
  }

  // Processes.
  async spawn(command: string, args: string[] = [], options: SpawnOptions = {}): Promise<{ pid: number }> {
    this.#alive();
    await this.#disk.refuseIfFull(`spawn ${command}`);
    const opts = expectObject("options", options ?? {});
    const { restartOnWake, ...spawnOptions } = opts;
    if (restartOnWake === undefined || restartOnWake === false) return this.#processes.spawn(command, args, spawnOptions);
    if (restartOnWake !== true) throw invalidArgument(`spawn: options.restartOnWake must be a boolean, got ${describe(restartOnWake)}`);
    const records = this.#wakeProcesses;
    if (!records) throw invalidArgument("spawn: restartOnWake needs a VM served by a registry server (an embedded VM never sleeps, so there is no wake to restart on)");
    const { pid } = await this.#processes.spawn(command, args, spawnOptions);
    // Recorded once it started: a command that cannot start is not retried on every wake.
    const id = records.add({
      command,
      args,
      ...(spawnOptions.cwd !== undefined ? { cwd: spawnOptions.cwd as string } : {}),
      ...(spawnOptions.env !== undefined ? { env: spawnOptions.env as Record<string, string> } : {}),
    });
    this.#wakeProcessIds.set(pid, id);
    return { pid };
  }

  /**
   * Sets this VM's own lifecycle bounds, in place of its definition's: a number of
   * seconds, or null to go back to the definition's (a key left out keeps its current
   * value). maxLifetimeSeconds counts from the VM's creation; a VM already past it is
   * destroyed. Returns the bounds now in force. Only on a VM served by a registry.
   */
  async setLifecycle(options: { maxLifetimeSeconds?: number | null; idleTimeoutSeconds?: number | null }): Promise<VmLifecycle> {
    this.#alive();
    const opts = expectObject("setLifecycle options", options);
    expectKnownKeys("setLifecycle options", opts, ["maxLifetimeSeconds", "idleTimeoutSeconds"]);
    const bound = (name: string): number | null | undefined => {
      const value = opts[name];
      if (value === undefined || value === null) return value;
      if (typeof value !== "number" || !Number.isFinite(value) || value <= 0 || value > MAX_LIFECYCLE_SECONDS) {
        throw invalidArgument(`setLifecycle: ${name} must be a number of seconds > 0 and at most ${MAX_LIFECYCLE_SECONDS}, or null for the definition's, got ${describe(value)}`);
      }
      return value;
    };
    const maxLifetimeSeconds = bound("maxLifetimeSeconds");
    const idleTimeoutSeconds = bound("idleTimeoutSeconds");
    const lifecycle = this.#lifecycle;
    if (!lifecycle) throw invalidArgument("setLifecycle: only a VM served by a registry server has a lifecycle (an embedded VM lives until dispose())");
    return lifecycle.set({
      ...(maxLifetimeSeconds !== undefined ? { maxLifetimeSeconds } : {}),
      ...(idleTimeoutSeconds !== undefined ? { idleTimeoutSeconds } : {}),
    });
  }

  /** Starts a recorded restart-on-wake process again (the server calls this as the VM wakes). */
  async resumeWakeProcess(process: { id: number; command: string; args: string[]; cwd?: string; env?: Record<string, string> }): Promise<{ pid: number }> {
    this.#alive();
    const { pid } = await this.#processes.spawn(process.command, process.args, { ...(process.cwd ? { cwd: process.cwd } : {}), ...(process.env ? { env: process.env } : {}) });
    this.#wakeProcessIds.set(pid, process.id);
    return { pid };
  }
  /**
   * Lets requests to a port nothing listens on yet wait up to `ms` for this running program
   * to open it (instead of the few seconds after any spawn): the server calls this for
   * programs it restarts as the VM wakes, whose dev servers may take a while.
   */
  expectListener(pid: number, ms: number): void {
    this.#alive();
    this.#processes.extendGrace(expectInteger("pid", pid, 1, 2 ** 22), expectInteger("ms", ms, 0, MAX_LISTEN_WAIT.ms));
  }
  /**
   * Runs a program to completion and returns its exit code and output. Bounded:
   * past `timeoutMs` (default 10 minutes) or `maxOutputBytes` of output (default
   * 64 MiB) the program is killed and the error (EXEC_TIMEOUT,
   * EXEC_OUTPUT_LIMIT) carries what it had printed in `details`.
   */
  async exec(command: string, args: string[] = [], options: ExecOptions = {}): Promise<ExecResult> {
    this.#alive();
    const opts = expectObject("options", options ?? {});
    const { timeoutMs: rawTimeout, maxOutputBytes: rawCap, onStdout, onStderr, ...spawnOptions } = opts;
    const callbacks = { stdout: expectCallback("options.onStdout", onStdout), stderr: expectCallback("options.onStderr", onStderr) };
    const timeoutMs = rawTimeout === undefined ? EXEC_TIMEOUT_MS : expectInteger("options.timeoutMs", rawTimeout, 1, 7 * 24 * 3600 * 1000);
    const maxOutputBytes = rawCap === undefined ? EXEC_MAX_OUTPUT : expectInteger("options.maxOutputBytes", rawCap, 0, Number.MAX_SAFE_INTEGER);
    const output = { stdout: [] as Uint8Array[], stderr: [] as Uint8Array[], bytes: 0 };
    let pid = -1;
    let exceeded: "EXEC_TIMEOUT" | "EXEC_OUTPUT_LIMIT" | undefined;
    let callbackError: unknown;
    const stop = (why: "EXEC_TIMEOUT" | "EXEC_OUTPUT_LIMIT") => {
      if (exceeded) return;
      exceeded = why;
      void this.#processes.kill(pid, "SIGKILL").catch(() => {});
    };
    const early: ProcessOutputEvent[] = [];
    const collect = (event: ProcessOutputEvent) => {
      if (pid === -1) return void early.push(event);
      if (event.pid !== pid || exceeded === "EXEC_OUTPUT_LIMIT") return;
      const room = maxOutputBytes - output.bytes;
      const kept = event.data.byteLength > room ? event.data.subarray(0, room) : event.data;
      output[event.stream].push(kept);
      if (kept.byteLength > 0 && callbacks[event.stream] && callbackError === undefined) {
        try {
          callbacks[event.stream]!(kept);
        } catch (error) {
          // The caller's bug: it must neither reach the VM's event plumbing nor leave the program running unobserved.
          callbackError = error;
          void this.#processes.kill(pid, "SIGKILL").catch(() => {});
        }
      }
      output.bytes += Math.min(room, event.data.byteLength);
      if (event.data.byteLength > room) stop("EXEC_OUTPUT_LIMIT");
    };
    await this.#disk.refuseIfFull(`exec ${command}`);
    this.on("processOutput", collect);
    let timer: NodeJS.Timeout | undefined;
    try {
      pid = (await this.#processes.spawn(command, args, spawnOptions)).pid;
      for (const event of early.splice(0)) collect(event);
      timer = setTimeout(() => stop("EXEC_TIMEOUT"), timeoutMs);
      const exitCode = await this.#processes.wait(pid);
      const text = (parts: Uint8Array[]) => Buffer.concat(parts).toString("utf8");
      const result = { pid, exitCode, stdout: text(output.stdout), stderr: text(output.stderr) };
      if (callbackError !== undefined) throw callbackError;
      if (exceeded === "EXEC_TIMEOUT") throw new AgentVmError(exceeded, `exec ${command}: still running after ${timeoutMs} ms (options.timeoutMs); it was killed`, { details: result });
      if (exceeded) throw new AgentVmError(exceeded, `exec ${command}: printed more than ${maxOutputBytes} bytes (options.maxOutputBytes); it was killed — use spawn and processOutput events for large output`, { details: result });
      return result;
    } finally {
      clearTimeout(timer);
      this.off("processOutput", collect);
    }
  }
  /**
   * Runs a program on a pseudo-terminal in the VM (default: bash, 80 × 24,
   * TERM=xterm-256color) and returns its handle: write keys, read output,
   * resize, signal, wait for its exit. Several may be open at once; each is a
   * process of the VM (limits.maxProcesses counts it).
   */
  async openTerminal(options: OpenTerminalOptions = {}): Promise<VmTerminal> {
    this.#alive();
    const { command, args, size, cwd, env } = parseTerminalOptions(options);
    await this.#disk.refuseIfFull(`openTerminal ${command}`);
    const { pid } = await this.#processes.spawn(command, args, { ...(cwd !== undefined ? { cwd } : {}), env }, size);
    return new VmTerminal(pid, size, {
      write: (target, data) => this.writeProcessStdin(target, data),
      resize: (target, next) => this.#processes.resize(target, next),
      kill: (target, signal) => this.killProcess(target, signal),
      subscribe: (target, onData, onExit) => {
        const output = (event: ProcessOutputEvent) => event.pid === target && onData(event.data);
        const exit = (event: ProcessExitEvent) => event.pid === target && onExit({ exitCode: event.exitCode, signal: event.signal } satisfies TerminalExit);
        this.on("processOutput", output);
        this.on("processExit", exit);
        return () => {
          this.off("processOutput", output);
          this.off("processExit", exit);
        };
      },
    });
  }
  async waitProcess(pid: number): Promise<number> {
    this.#alive();
    return this.#processes.wait(pid);
  }
  async killProcess(pid: number, signal?: string | number): Promise<void> {
    this.#alive();
    // Signalled through the API (whatever the signal): it is not restarted on the next wake.
    const wakeId = this.#wakeProcessIds.get(pid);
    if (wakeId !== undefined) {
      this.#wakeProcessIds.delete(pid);
      this.#wakeProcesses?.remove(wakeId);
    }
    await this.#processes.kill(pid, signal);
  }
  /** Processes started through the API (exited ones too) and every other process running in the VM. */
  async listProcesses(): Promise<ProcessInfo[]> {
    this.#alive();
    return this.#processes.list();
  }
  /** Memory, tasks and processes the VM uses now (memory and tasks need per-VM control groups, see docs/security.md). */
  async usage(): Promise<VmUsage> {
    this.#alive();
    const processes = this.#processes.running;
    const sandbox = await this.#processes.sandbox?.catch(() => undefined);
    const disk = await this.#disk.usage();
    if (!sandbox?.running || !this.#cgroup) {
      const caps = await VmCgroup.available();
      return caps ? { caps, memoryBytes: 0, memoryPeakBytes: 0, oomKills: 0, tasks: 0, processes, disk } : { caps, processes, disk };
    }
    const used = await this.#cgroup.usage();
    return { caps: true, memoryBytes: used.memoryBytes, memoryPeakBytes: used.memoryPeakBytes, oomKills: used.oomKills, tasks: used.tasks, processes, disk };
  }
  /**
   * A process's recent output (the last limits.logBytes of it), after position
   * `since` or the last `tail` bytes: nothing printed before anyone listened is lost.
   */
  async getProcessLogs(pid: number, options: { since?: number; tail?: number } = {}): Promise<ProcessLogs> {
    this.#alive();
    const opts = expectObject("options", options ?? {});
    expectKnownKeys("options", opts, ["since", "tail"]);
    const since = opts.since === undefined ? undefined : expectInteger("options.since", opts.since, 0, Number.MAX_SAFE_INTEGER);
    const tail = opts.tail === undefined ? undefined : expectInteger("options.tail", opts.tail, 0, Number.MAX_SAFE_INTEGER);
    const logs = this.#processes.logs(pid, { ...(since !== undefined ? { since } : {}), ...(tail !== undefined ? { tail } : {}) });
    return { pid: logs.pid, dropped: logs.dropped, output: logs.output.map(({ seq, stream, data }) => ({ seq, stream, data })) };
  }
  /** Output events after position `since`, from the processes' logs (for a subscriber that starts late). */
  outputSince(since: number): ProcessOutputEvent[] {
    this.#alive();
    return this.#processes.outputSince(since).map(({ seq, pid, stream, data }) => ({ seq, pid, stream, data }));
  }
  /** How many processes started through the API run now (what keeps a server's VM awake). */
  runningProcessCount(): number {
    return this.#processes.running;
  }
  async writeProcessStdin(pid: number, data: string | Uint8Array): Promise<void> {
    this.#alive();
    return this.#processes.writeStdin(pid, toBytes("data", data));
  }
  closeProcessStdin(pid: number): void {
    this.#alive();
    this.#processes.closeStdin(pid);
  }

  // Network.
  async vmFetch(port: number, path: string, init?: VmFetchInit): Promise<VmFetchResponse> {
    this.#alive();
    return this.#fetcher.fetch(port, path, init);
  }
  async vmFetchStream(port: number, path: string, init?: VmFetchInit): Promise<VmFetchStreamResponse> {
    this.#alive();
    return this.#fetcher.fetchStream(port, path, init);
  }
  /** vmFetchStream with the body as a Node Readable, for host code that pipes it on. */
  vmFetchReadable(port: number, path: string, init?: VmFetchInit): Promise<Omit<VmFetchResponse, "body"> & { body: Readable }> {
    this.#alive();
    return this.#fetcher.fetchReadable(port, path, init);
  }
  /** A raw HTTP request into the VM (for proxies); see VmFetcher.request. */
  httpRequest(port: number, options: { method: string; path: string; headers: OutgoingHttpHeaders }): ClientRequest {
    this.#alive();
    return this.#fetcher.request(expectPort("port", port), options);
  }
  /** A TCP connection to a port in the VM, as a program on the VM's loopback would have it. */
  async connectToPort(port: number): Promise<Socket> {
    this.#alive();
    return this.#fetcher.connect(expectPort("port", port));
  }
  /** TCP ports programs in the VM listen on right now. */
  async listeningPorts(): Promise<number[]> {
    this.#alive();
    const sandbox = await this.#processes.sandbox?.catch(() => undefined);
    return sandbox ? sandbox.listeningPorts() : [];
  }
  /** Connections into the VM the server holds open now (vmFetch keep-alive, previews). */
  networkStats(): { connections: number } {
    return { connections: this.#openConnections };
  }

  // Previews.
  async createSignedPreviewUrl(port: number, ttlSeconds?: number): Promise<PreviewUrl> {
    this.#alive();
    return this.#previewTokens().create(port, ttlSeconds);
  }
  /** Revokes a preview token at once; resolves to whether it was active. */
  async expireSignedPreviewUrl(token: string): Promise<boolean> {
    this.#alive();
    return this.#previewTokens().expire(token);
  }
  async listPreviewUrls(): Promise<PreviewInfo[]> {
    this.#alive();
    return this.#previewTokens().list();
  }
  /** Revokes every preview token of this VM (or of one port); resolves to how many. */
  async expireAllPreviewUrls(port?: number): Promise<number> {
    this.#alive();
    return this.#previewTokens().expireAll(port);
  }

  /**
   * Embedded use: serves this VM's preview URLs (`http://<host>:<port>` + `path`)
   * on a local HTTP server, with the same gateway a registry server runs. A VM
   * that belongs to a registry has its previews served by that server instead.
   */
  async servePreviews(options: { port?: number; host?: string; previewHost?: string } = {}): Promise<{ url: string; close(): Promise<void> }> {
    this.#alive();
    const config = expectObject("options", options);
    expectKnownKeys("options", config, ["port", "host", "previewHost"]);
    if (this.#servedByRegistry) {
      throw new AgentVmError("INVALID_ARGUMENT", `servePreviews: VM ${this.name} belongs to a registry server, which serves its previews on its own preview origin (server.previewUrl)`);
    }
    const port = options.port === undefined ? 0 : expectInteger("options.port", options.port, 0, 65535);
    const host = options.host === undefined ? "127.0.0.1" : expectString("options.host", options.host, { nonEmpty: true });
    this.#previewTokens();
    const gateway = new PreviewGateway({
      store: this.#ownPreviewStore!,
      ...(options.previewHost !== undefined ? { previewHost: expectString("options.previewHost", options.previewHost, { nonEmpty: true }) } : {}),
      owns: (row) => row.definition === "" && row.key === this.name,
      acquire: async () => ({ vm: this, release() {} }),
    });
    const server = createHttpServer((request, response) => {
      if (!gateway.handleRequest(request, response)) response.writeHead(404, { "content-type": "text/plain" }).end("Not a preview URL\n");
    });
    server.on("upgrade", (request, socket, head) => {
      if (!gateway.handleUpgrade(request, socket, head)) socket.destroy();
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", (error) => reject(new AgentVmError("EADDRINUSE", `servePreviews: cannot listen on ${host}:${port}: ${error.message}`)));
      server.listen(port, host, () => resolve());
    });
    const bound = (server.address() as { port: number }).port;
    const url = `http://${host.includes(":") ? `[${host}]` : host}:${bound}`;
    const close = () =>
      new Promise<void>((resolve) => {
        this.#previewServers.delete(close);
        this.#previewOrigins.delete(close);
        if (this.#previewOrigin === url && !this.#disposed) this.#setPreviewOrigin([...this.#previewOrigins.values()].at(-1));
        server.close(() => resolve());
        server.closeAllConnections();
      });
    this.#previewServers.add(close);
    this.#previewOrigins.set(close, url);
    // createSignedPreviewUrl's `url` names the most recently started preview server.
    this.#setPreviewOrigin(url);
    return { url, close };
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Ends every guest process and frees the VM; its files stay on disk. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const watch of [...this.#watches]) watch.end(new AgentVmError("VM_DISPOSED", `the watch on ${watch.path} ended: VM ${this.name} was disposed (or went to sleep)`));
    this.#fetcher.close();
    await this.#processes.dispose();
    if (this.#stagedRoot) await release(this.root);
    await this.#disk.release();
    await Promise.all([...this.#previewServers].map((close) => close()));
    this.#ownStore?.close();
    this.removeAllListeners();
    this.#denialLog.flush();
    await endRun(this.#vmDir).catch(() => undefined);
  }

  /**
   * The VM's root and image directories as bubblewrap, running as the VM's
   * unprivileged host id, can reach them (staging.ts); as they are where the
   * guests are the server's own user.
   */
  async #stagedPaths(image: VmImage, identity: GuestIdentity | undefined): Promise<{ vmRoot: string; image: VmImage }> {
    if (!identity) return { vmRoot: this.root, image };
    this.#stagedRoot ??= stage(this.root, false);
    const [vmRoot, imageRoot, layers] = await Promise.all([
      this.#stagedRoot,
      stage(image.root, true),
      Promise.all(image.layers.map(async (layer) => ({ ...layer, dir: await stage(layer.dir, true) }))),
    ]);
    return { vmRoot, image: { ...image, root: imageRoot, layers } };
  }

  #previewTokens(): PreviewTokens {
    if (!this.#previews) {
      this.#ownStore = new SqliteStore(this.#dataDir);
      this.#ownPreviewStore = new PreviewStore(this.#ownStore);
      this.#previews = new PreviewTokens(this.#ownPreviewStore, this.#previewConfig, { definition: "", key: this.name });
    }
    return this.#previews;
  }

  #setPreviewOrigin(origin: string | undefined): void {
    this.#previewOrigin = origin;
    this.#previewTokens().setOrigin(origin);
  }

  /** Network denials: how many since the VM started, and the most recent ones. */
  networkDenials(): { count: number; recent: Denial[] } {
    return { count: this.#denialCount, recent: [...this.#denials] };
  }

  #recordDenial(denial: Denial): void {
    this.#denialCount++;
    this.#denials.push(denial);
    if (this.#denials.length > RECENT_DENIALS) this.#denials.shift();
    // A structured line per denial for whoever collects the server's logs, rate-limited per VM.
    this.#denialLog.report(denial);
  }

  async #connect(port: number, wait: ListenWait[]): Promise<Socket> {
    const sandbox = await this.#processes.sandbox?.catch(() => undefined);
    if (!sandbox?.running) throw Object.assign(new Error(`nothing listens on port ${port}: the VM runs no programs`), { code: "ECONNREFUSED" });
    const socket = await sandbox.connect(port, wait);
    this.#openConnections++;
    socket.once("close", () => this.#openConnections--);
    return socket;
  }

  #alive(): void {
    if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `VM ${this.name} was disposed; create a new one with createVm()`);
  }
}

function expectCallback(name: string, value: unknown): ((data: Uint8Array) => void) | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "function") throw invalidArgument(`${name} must be a function, got ${describe(value)}`);
  return value as (data: Uint8Array) => void;
}

function writeOptions(options: unknown): WriteOptions | undefined {
  if (options === undefined) return undefined;
  expectKnownKeys("options", expectObject("options", options), ["mode", "append"]);
  return options as WriteOptions;
}

export async function createVm(options: CreateVmOptions, services: VmHostServices = {}): Promise<Vm> {
  const config = expectObject("options", options);
  expectKnownKeys("options", config, ["dataDir", "name", "software", "permissions", "listen", "limits", "runtime", "preview", "hosts"]);
  const dataDir = resolve(expectString("options.dataDir", config.dataDir, { nonEmpty: true }));
  const name = config.name === undefined ? "default" : expectString("options.name", config.name, { nonEmpty: true });
  if (name.length > MAX_NAME || /[\u0000-\u001f\u007f]/.test(name)) {
    throw invalidArgument(`options.name must be at most ${MAX_NAME} printable characters, got ${describe(name)}`);
  }
  const listen = parseListenPolicy(config.listen, "listen");
  const preview = parsePreviewConfig(config.preview, "preview");
  const limits = parseLimits(config.limits);
  const permissions = config.permissions === undefined ? {} : expectObject("permissions", config.permissions);
  expectKnownKeys("permissions", permissions, ["network"]);
  const network = parseNetworkPolicy(permissions.network, "permissions.network");
  const hosts = parseHosts(config.hosts);
  const runtimeOption = config.runtime === undefined ? {} : expectObject("options.runtime", config.runtime);
  expectKnownKeys("options.runtime", runtimeOption, ["node"]);
  const nodeOverride = runtimeOption.node === undefined ? undefined : expectString("options.runtime.node", runtimeOption.node, { nonEmpty: true });

  const software = parseSoftware(config.software ?? [], "software");

  const [bwrap, image] = await Promise.all([findBubblewrap(), ensureImage({ software, ...(nodeOverride !== undefined ? { node: nodeOverride } : {}) })]);
  const vmDir = join(dataDir, "vms", vmDirectoryName(name));
  const { disk, identity } = await prepareVmDirectory(bwrap, dataDir, vmDir, limits);
  // After the disk is mounted: the temporary files a crash left are inside it.
  await beginRun(vmDir, join(vmDir, "root"));
  return new Vm({ name, vmDir, dataDir, listen, network, hosts, limits, preview, bwrap, image, services, disk, identity });
}

/** The VM's directory under `<dataDir>/vms`: the name itself when it is a safe file name, else a hash of it. */
export function vmDirectoryName(name: string): string {
  return SAFE_DIRECTORY.test(name) ? name : `vm-${createHash("sha256").update(name).digest("hex").slice(0, 32)}`;
}

export function parseHosts(value: unknown): ReadonlyMap<string, string> {
  const hosts = new Map<string, string>();
  if (value === undefined) return hosts;
  for (const [name, address] of Object.entries(expectObject("hosts", value))) {
    if (typeof address !== "string" || isIP(address) === 0) throw invalidArgument(`hosts.${name} must be an IP address, got ${describe(address)}`);
    if (!/^[a-z0-9_.-]+$/i.test(name)) throw invalidArgument(`hosts: ${JSON.stringify(name)} is not a host name`);
    hosts.set(name.toLowerCase(), address);
  }
  return hosts;
}

export function parseLimits(value: unknown): Required<VmLimits> {
  if (value === undefined) return { ...DEFAULT_LIMITS };
  const limits = expectObject("limits", value);
  expectKnownKeys("limits", limits, Object.keys(DEFAULT_LIMITS));
  const out = { ...DEFAULT_LIMITS };
  const minimum: Record<keyof VmLimits, number> = { maxProcesses: 1, memoryMb: 32, openFiles: 64, totalMemoryMb: 64, maxTasks: 16, cpuShares: 2, logBytes: 0, diskBytes: 16 * 1024 * 1024, diskInodes: 1024, maxEgressInFlight: 1, maxDnsInFlight: 1 };
  for (const key of Object.keys(DEFAULT_LIMITS) as (keyof VmLimits)[]) {
    const raw = limits[key];
    if (raw === undefined) continue;
    if (typeof raw !== "number" || !Number.isInteger(raw) || raw < minimum[key]) {
      throw invalidArgument(`limits.${key} must be an integer ≥ ${minimum[key]}, got ${describe(raw)}`);
    }
    out[key] = raw;
  }
  return out;
}

/** What the Node preload reads at /run/agentvm-guest.json (see init/node-preload.cts). */
async function writeGuestConfig(vmDir: string, listen: ListenPolicy, network: NetworkPolicy): Promise<string> {
  const file = join(vmDir, "etc/agentvm-guest.json");
  await writeFile(file, JSON.stringify({ servicePort: EGRESS_PORTS.node, listenDenials: listenDenials(listen, network), autoRange: autoRange(listen) }));
  return file;
}

/**
 * The VM's directory: `root/` holds what programs may write (`/home`, `/tmp`,
 * `/var`, and top-level directories the files API made) — the VM's disk, capped
 * where the host allows (vm-disk.ts) — and `etc/` the files the sandbox copies
 * over the image's placeholders. The data directory's `vms/` and each VM's
 * directory are 0700, root/ and everything in it belong to the VM's guests'
 * host id (guest-identity.ts); a directory from before that is handed over once.
 */
async function prepareVmDirectory(bwrap: string, dataDir: string, vmDir: string, limits: Required<VmLimits>): Promise<{ disk: VmDisk; identity: GuestIdentity | undefined }> {
  await mkdir(join(vmDir, "etc"), { recursive: true });
  await chmod(join(dataDir, "vms"), 0o700);
  await chmod(vmDir, 0o700);
  const disk = await VmDisk.attach(vmDir, { bytes: limits.diskBytes, inodes: limits.diskInodes });
  try {
    const root = join(vmDir, "root");
    const identity = await guestIdentity(bwrap, dataDir, root);
    if (identity && (await stat(root)).uid !== identity.uid) {
      // Not the guests' yet (new, or from before ids): all of it becomes theirs. -R -P: links are changed themselves, never followed.
      // A new VM's root is empty: one chown of it does the same without starting a process.
      if ((await readdir(root)).length === 0) await chown(root, identity.uid, identity.gid);
      else await promisify(execFile)("chown", ["-R", "-P", `${identity.uid}:${identity.gid}`, "--", root], { timeout: 600_000 });
    }
    // The guests' `/`: nobody else on the host walks into it.
    await chmod(root, 0o700);
    // Through the VM's own resolution: a guest's symlink at /home or /tmp leads into the VM, never to a host path.
    const files = new VmFilesystem(root, { readOnly: [], ...(identity ? { owner: identity } : {}) });
    // Side by side: three separate trees, each walked on its own.
    await Promise.all([GUEST_HOME, "/tmp", "/var/tmp"].map((dir) => files.mkdir(dir, { recursive: true })));
    await writeFile(join(vmDir, "etc/hosts"), "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
    // init's resolver on the VM's loopback answers every name by the network policy.
    await writeFile(join(vmDir, "etc/resolv.conf"), "nameserver 127.0.0.1\noptions ndots:0\n");
    return { disk, identity };
  } catch (error) {
    await disk.release();
    throw error;
  }
}
