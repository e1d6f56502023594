/**
 * The embedded API: `createVm()` returns one VM — a filesystem, a process table
 * and a socket table in this process, with guests confined in sandboxes. Method
 * names match the seed actions so the server can expose them one to one.
 */
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import { mkdir, symlink, writeFile, readlink, lstat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { AgentVmError, invalidArgument } from "./errors.ts";
import { VmFilesystem, type VmStat } from "./kernel/filesystem.ts";
import { autoRange, parseListenPolicy, type ListenConfig, type ListenPolicy } from "./kernel/listen-policy.ts";
import { ProcessTable, type OutputStream, type ProcessInfo } from "./kernel/process-table.ts";
import { SocketTable } from "./kernel/socket-table.ts";
import { Egress, type Denial } from "./kernel/egress.ts";
import { parseNetworkPolicy, type NetworkPermission, type NetworkPolicy } from "./kernel/network-policy.ts";
import { isIP } from "node:net";
import { parsePreviewConfig, PreviewTokens, type PreviewConfig, type PreviewInfo, type PreviewUrl, type ResolvedPreviewConfig } from "./net/previews.ts";
import { PreviewStore } from "./store/preview-store.ts";
import { SqliteStore } from "./store/sqlite-store.ts";
import { VmFetcher, type VmFetchInit, type VmFetchResponse, type VmFetchStreamResponse } from "./net/vm-fetch.ts";
import { findBubblewrap, GUEST_UID, sandboxMountPoints } from "./sandbox/bubblewrap.ts";
import { resolveGuestRuntime } from "./sandbox/guest-runtime.ts";
import { launchGuest } from "./sandbox/launcher.ts";
import { STREAM_WINDOW } from "./guest/protocol.ts";
import { describe, expectInteger, expectKnownKeys, expectObject, expectPort, expectString, toBytes } from "./validate.ts";
import { createServer as createHttpServer } from "node:http";
import { PreviewGateway } from "./net/gateway.ts";
import type { ClientRequest, OutgoingHttpHeaders } from "node:http";
import type { Duplex, Readable } from "node:stream";

export interface VmLimits {
  /** Processes running at once in the VM (default 32). */
  maxProcesses?: number;
  /** Listeners, connections and UDP sockets together (default 1024). */
  maxSockets?: number;
  /** Memory per guest process in MiB: the V8 heap cap; the OS limit sits above it (default 256). */
  memoryMb?: number;
  /** Pre-started guests kept ready once the VM has spawned (default 1; 0 turns the pool off). */
  poolSize?: number;
  /** The pool empties after this long without a spawn (default 60 s). */
  poolIdleMs?: number;
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
  permissions?: PermissionsConfig;
  listen?: ListenConfig;
  limits?: VmLimits;
  /** Guest runtime override: path to a Node ≥ 26 binary (also AGENTVM_GUEST_NODE). */
  runtime?: { node?: string };
  /** Preview URL lifetimes and caps. */
  preview?: PreviewConfig;
  /** Like /etc/hosts for the VM: name → IP address. Policy still applies to both. */
  hosts?: Record<string, string>;
}

/** Wiring a server passes to createVm (not for embedders). */
export interface VmHostServices {
  previews?: PreviewTokens;
}

export interface ProcessOutputEvent {
  pid: number;
  stream: OutputStream;
  data: Uint8Array;
}

export interface ProcessExitEvent {
  pid: number;
  exitCode: number;
}

export interface ExecResult {
  pid: number;
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface VmEvents {
  processOutput: [ProcessOutputEvent];
  processExit: [ProcessExitEvent];
}

/** Names that can be used as a directory name as they are; others are hashed. */
const SAFE_DIRECTORY = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MAX_NAME = 256;
const RECENT_DENIALS = 100;
const DEFAULT_LIMITS: Required<VmLimits> = { maxProcesses: 32, maxSockets: 1024, memoryMb: 256, poolSize: 1, poolIdleMs: 60_000 };
/**
 * RLIMIT_DATA above the heap cap. Node 26 needs a fixed ~565 MiB of it to boot
 * whatever the heap cap (~590 MiB once WebAssembly loads: TypeScript stripping,
 * fetch's llhttp), so 512 broke every guest below memoryMb ≈ 70. The rest is
 * room for Buffers and other memory outside the V8 heap.
 */
const DATA_HEADROOM_MB = 768;

export class Vm extends EventEmitter<VmEvents> {
  readonly name: string;
  readonly root: string;
  readonly listenPolicy: ListenPolicy;
  readonly #fs: VmFilesystem;
  readonly #sockets: SocketTable;
  readonly #processes: ProcessTable;
  readonly #fetcher: VmFetcher;
  readonly #egress: Egress;
  readonly #denials: Denial[] = [];
  #denialCount = 0;
  readonly #dataDir: string;
  readonly #previewConfig: ResolvedPreviewConfig;
  #previews: PreviewTokens | undefined;
  /** Opened here only for an embedded VM's previews; a server passes its own. */
  #ownStore: SqliteStore | undefined;
  readonly #servedByRegistry: boolean;
  readonly #previewServers = new Set<() => Promise<void>>();
  #disposed = false;

  /** Use createVm(); the constructor expects validated options and a prepared root. */
  constructor(init: {
    name: string;
    root: string;
    dataDir: string;
    listen: ListenPolicy;
    network: NetworkPolicy;
    hosts: ReadonlyMap<string, string>;
    limits: Required<VmLimits>;
    preview: ResolvedPreviewConfig;
    bwrap: string;
    nodeBinary: string;
    services: VmHostServices;
  }) {
    super();
    // Each exec() in flight listens for output: concurrent execs are normal, not a leak.
    this.setMaxListeners(0);
    this.name = init.name;
    this.root = init.root;
    this.#dataDir = init.dataDir;
    this.#previewConfig = init.preview;
    this.#previews = init.services.previews;
    this.#servedByRegistry = init.services.previews !== undefined;
    this.listenPolicy = init.listen;
    this.#fs = new VmFilesystem(init.root);
    this.#egress = new Egress({
      vmName: init.name,
      policy: init.network,
      hosts: init.hosts,
      onDenied: (denial) => this.#recordDenial(denial),
    });
    this.#sockets = new SocketTable({
      vmName: init.name,
      listen: init.listen,
      limits: { maxSockets: init.limits.maxSockets, streamWindow: STREAM_WINDOW },
      outbound: this.#egress,
    });
    const portRange = autoRange(init.listen).join("-");
    const guestLimits = { heapMb: init.limits.memoryMb, dataMb: init.limits.memoryMb + DATA_HEADROOM_MB, maxFiles: 4096 };
    this.#processes = new ProcessTable({
      vmName: init.name,
      fs: this.#fs,
      sockets: this.#sockets,
      maxProcesses: init.limits.maxProcesses,
      poolSize: init.limits.poolSize,
      poolIdleMs: init.limits.poolIdleMs,
      launch: (mode, cwd, env) =>
        launchGuest({ bwrap: init.bwrap, nodeBinary: init.nodeBinary, root: init.root, cwd, env: { ...env, AGENTVM_PORT_RANGE: portRange }, limits: guestLimits, mode }),
      resolve: (hostname, pid) => this.#resolve(hostname, pid),
      onOutput: (pid, stream, data) => this.emit("processOutput", { pid, stream, data }),
      onExit: (pid, exitCode) => this.emit("processExit", { pid, exitCode }),
    });
    this.#fetcher = new VmFetcher(this.#sockets, init.name, () => this.#processes.startupGraceMs());
    // The warm pool fills on the first spawn, not here: a VM that only stores files
    // costs no guest (200 idle VMs would otherwise hold 200 sandboxes).
  }

  // Files. Methods that return a promise are async so that every failure, VM_DISPOSED
  // and bad arguments included, is a rejection rather than a synchronous throw.
  async writeFile(path: string, content: string | Uint8Array): Promise<void> {
    this.#alive();
    return this.#fs.writeFile(path, toBytes("content", content));
  }
  async readFile(path: string): Promise<Uint8Array> {
    this.#alive();
    return this.#fs.readFile(path);
  }
  async mkdir(path: string, options?: { recursive?: boolean }): Promise<void> {
    this.#alive();
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
  async spawn(command: string, args: string[] = [], options: { cwd?: string; env?: Record<string, string> } = {}): Promise<{ pid: number }> {
    this.#alive();
    return this.#processes.spawn(command, args, options);
  }
  /** Runs a program to completion and returns its exit code and output. */
  async exec(command: string, args: string[] = [], options: { cwd?: string; env?: Record<string, string> } = {}): Promise<ExecResult> {
    this.#alive();
    const stdout: Uint8Array[] = [];
    const stderr: Uint8Array[] = [];
    let pid = -1;
    const early: ProcessOutputEvent[] = [];
    const collect = (event: ProcessOutputEvent) => {
      if (pid === -1) early.push(event);
      else if (event.pid === pid) (event.stream === "stdout" ? stdout : stderr).push(event.data);
    };
    this.on("processOutput", collect);
    try {
      pid = (await this.#processes.spawn(command, args, options)).pid;
      for (const event of early) collect(event);
      const exitCode = await this.#processes.wait(pid);
      const text = (parts: Uint8Array[]) => Buffer.concat(parts).toString("utf8");
      return { pid, exitCode, stdout: text(stdout), stderr: text(stderr) };
    } finally {
      this.off("processOutput", collect);
    }
  }
  async waitProcess(pid: number): Promise<number> {
    this.#alive();
    return this.#processes.wait(pid);
  }
  async killProcess(pid: number, signal?: string | number): Promise<void> {
    this.#alive();
    return this.#processes.kill(pid, signal);
  }
  listProcesses(): ProcessInfo[] {
    this.#alive();
    return this.#processes.list();
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
  /** A raw byte stream to a port in the VM, like a TCP connection from the host's side. */
  connectToPort(port: number): Duplex {
    this.#alive();
    return this.#fetcher.connect(expectPort("port", port));
  }
  /** Ports guests listen on right now. */
  listeningPorts(): number[] {
    this.#alive();
    return this.#sockets.listeningPorts();
  }
  networkStats(): SocketTable["stats"] {
    return this.#sockets.stats;
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
      throw new AgentVmError("INVALID_ARGUMENT", `servePreviews: VM ${this.name} belongs to a registry server, which serves its previews at /preview/`);
    }
    const port = options.port === undefined ? 0 : expectInteger("options.port", options.port, 0, 65535);
    const host = options.host === undefined ? "127.0.0.1" : expectString("options.host", options.host, { nonEmpty: true });
    this.#previewTokens();
    const gateway = new PreviewGateway({
      store: new PreviewStore(this.#ownStore!),
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
    const close = () =>
      new Promise<void>((resolve) => {
        this.#previewServers.delete(close);
        server.close(() => resolve());
        server.closeAllConnections();
      });
    this.#previewServers.add(close);
    const bound = (server.address() as { port: number }).port;
    return { url: `http://${host.includes(":") ? `[${host}]` : host}:${bound}`, close };
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Ends every guest process and frees the VM; its files stay on disk. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#fetcher.close();
    await this.#processes.dispose();
    await Promise.all([...this.#previewServers].map((close) => close()));
    this.#ownStore?.close();
    this.removeAllListeners();
  }

  #previewTokens(): PreviewTokens {
    if (!this.#previews) {
      this.#ownStore = new SqliteStore(this.#dataDir);
      this.#previews = new PreviewTokens(new PreviewStore(this.#ownStore), this.#previewConfig, { definition: "", key: this.name });
    }
    return this.#previews;
  }

  /** Network denials: how many since the VM started, and the most recent ones. */
  networkDenials(): { count: number; recent: Denial[] } {
    return { count: this.#denialCount, recent: [...this.#denials] };
  }

  #recordDenial(denial: Denial): void {
    this.#denialCount++;
    this.#denials.push(denial);
    if (this.#denials.length > RECENT_DENIALS) this.#denials.shift();
    // One structured line per denial, for whoever collects the server's logs.
    console.warn(`agentvm network denied ${JSON.stringify(denial)}`);
  }

  async #resolve(hostname: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]> {
    const name = hostname.toLowerCase();
    if (name === "localhost" || name.endsWith(".localhost") || name === "") {
      return [
        { address: "127.0.0.1", family: 4 },
        { address: "::1", family: 6 },
      ];
    }
    return this.#egress.lookup(name, pid);
  }

  #alive(): void {
    if (this.#disposed) throw new AgentVmError("VM_DISPOSED", `VM ${this.name} was disposed; create a new one with createVm()`);
  }
}

export async function createVm(options: CreateVmOptions, services: VmHostServices = {}): Promise<Vm> {
  const config = expectObject("options", options);
  expectKnownKeys("options", config, ["dataDir", "name", "permissions", "listen", "limits", "runtime", "preview", "hosts"]);
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

  const [bwrap, runtime] = await Promise.all([findBubblewrap(), resolveGuestRuntime(nodeOverride)]);
  const root = join(dataDir, "vms", vmDirectoryName(name), "root");
  await prepareRoot(root);
  return new Vm({ name, root, dataDir, listen, network, hosts, limits, preview, bwrap, nodeBinary: runtime.binary, services });
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
  const minimum: Record<keyof VmLimits, number> = { maxProcesses: 1, maxSockets: 1, memoryMb: 32, poolSize: 0, poolIdleMs: 0 };
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

/** Lays out the VM's `/` with the mount points the sandbox binds over, once. */
async function prepareRoot(root: string): Promise<void> {
  const layout = sandboxMountPoints();
  for (const dir of layout.dirs) await mkdir(join(root, dir), { recursive: true });
  for (const file of layout.files) {
    await mkdir(dirname(join(root, file)), { recursive: true });
    await writeFile(join(root, file), "", { flag: "a" });
  }
  for (const [path, target] of layout.symlinks) {
    const at = join(root, path);
    const existing = await lstat(at).catch(() => undefined);
    if (existing?.isSymbolicLink() && (await readlink(at)) === target) continue;
    if (!existing) await symlink(target, at);
  }
  await symlink("/usr/share/zoneinfo/UTC", join(root, "etc/localtime")).catch(ignoreExists);
  await writeFile(join(root, "etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n", { flag: "wx" }).catch(ignoreExists);
  await writeFile(join(root, "etc/passwd"), `root:x:0:0:root:/root:/bin/sh\nagentos:x:${GUEST_UID}:${GUEST_UID}:agentos:/home/agentos:/bin/sh\n`, { flag: "wx" }).catch(ignoreExists);
  await writeFile(join(root, "etc/group"), `root:x:0:\nagentos:x:${GUEST_UID}:\n`, { flag: "wx" }).catch(ignoreExists);
}

function ignoreExists(error: NodeJS.ErrnoException): void {
  if (error.code !== "EEXIST") throw error;
}
