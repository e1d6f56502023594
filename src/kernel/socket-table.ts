/**
 * One VM's network: the ports its guests listen on, the connections between
 * them, and UDP sockets — loopback only (DESIGN §3). Nothing here opens a real
 * socket; two VMs each have their own table, so both may listen on 3000 and
 * never see each other.
 *
 * The table owns port numbers and caps; the bytes of a connection flow through
 * StreamEnd pairs (stream.ts) without being buffered here.
 */
import { AgentVmError, type ErrorCode } from "../errors.ts";
import { isLoopbackBind, isLoopbackDestination } from "./addresses.ts";
import { autoRange, checkListenPort, type ListenPolicy } from "./listen-policy.ts";
import { StreamEnd, type StreamOwner, type StreamStats } from "./stream.ts";
import { realSocketOwner } from "./real-socket.ts";
import type { Socket } from "node:net";

export interface ConnectionInfo {
  localPort: number;
  remotePort: number;
  remoteAddress: string;
}

/** Called for each connection a listener accepts; returns the owner of the server end. */
export type Acceptor = (end: StreamEnd, info: ConnectionInfo) => StreamOwner;

export interface UdpOwner {
  message(data: Buffer, from: { address: string; port: number }): void;
}

export interface SocketTableLimits {
  /** Listeners, connections (counted once per connection) and UDP sockets together. */
  maxSockets: number;
  /** Bytes one direction of a connection may have in flight. */
  streamWindow: number;
}

/** The way out of the VM (egress.ts): policy, floor and real connections. */
export interface Outbound {
  connect(host: string, port: number, pid: number): Promise<Socket>;
  checkListen(port: number, pid: number): void;
  checkUdp(host: string, port: number, pid: number): never;
}

export interface SocketTableOptions {
  vmName: string;
  listen: ListenPolicy;
  limits: SocketTableLimits;
  /** Destinations outside the VM; without it they are all refused. */
  outbound?: Outbound;
}

const EPHEMERAL_LOW = 49152;
const EPHEMERAL_HIGH = 65535;

export class SocketTable {
  readonly #options: SocketTableOptions;
  readonly #listeners = new Map<number, Acceptor>();
  readonly #udp = new Map<number, UdpOwner>();
  readonly #listenWaiters = new Map<number, Set<(listening: boolean) => void>>();
  readonly #streams: StreamStats = { open: 0, inFlightBytes: 0 };
  #nextEphemeral = EPHEMERAL_LOW;

  constructor(options: SocketTableOptions) {
    this.#options = options;
  }

  get stats(): { listeners: number; connections: number; udpSockets: number; inFlightBytes: number } {
    return {
      listeners: this.#listeners.size,
      connections: this.#streams.open,
      udpSockets: this.#udp.size,
      inFlightBytes: this.#streams.inFlightBytes,
    };
  }

  hasListener(port: number): boolean {
    return this.#listeners.has(port);
  }

  /** Resolves true once something listens on `port`, or false after `ms`. */
  waitForListener(port: number, ms: number): Promise<boolean> {
    if (this.#listeners.has(port)) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiters = this.#listenWaiters.get(port) ?? new Set();
      this.#listenWaiters.set(port, waiters);
      const done = (listening: boolean) => {
        clearTimeout(timer);
        waiters.delete(done);
        if (waiters.size === 0) this.#listenWaiters.delete(port);
        resolve(listening);
      };
      const timer = setTimeout(() => done(false), ms);
      waiters.add(done);
    });
  }

  listeningPorts(): number[] {
    return [...this.#listeners.keys()].sort((a, b) => a - b);
  }

  /** Binds a TCP port; 0 allocates one. Returns the bound port. */
  listen(port: number, host: string | undefined, acceptor: Acceptor, pid = 0): number {
    this.#checkBindAddress("listen", host, port);
    this.#checkCapacity("listen");
    const bound = port === 0 ? this.#allocate(this.#listeners, "listen") : port;
    if (port !== 0) {
      checkListenPort(this.#options.listen, port);
      if (this.#listeners.has(port)) {
        throw new AgentVmError("EADDRINUSE", `listen on port ${port}: the port is already in use in VM ${this.#options.vmName}`);
      }
    }
    this.#options.outbound?.checkListen(bound, pid);
    this.#listeners.set(bound, acceptor);
    // Wake waiters on a later turn: the guest must have the listen reply before the first accept.
    const waiters = this.#listenWaiters.get(bound);
    if (waiters) setImmediate(() => [...waiters].forEach((wake) => wake(this.#listeners.has(bound))));
    return bound;
  }

  unlisten(port: number, acceptor: Acceptor): void {
    if (this.#listeners.get(port) === acceptor) this.#listeners.delete(port);
  }

  /**
   * Opens a connection to `port` on `host` and returns the client's end.
   * Loopback destinations reach this table's listeners; anything else is for the
   * outbound policy to decide (refused by default).
   */
  connect(host: string | undefined, port: number, client: StreamOwner): { end: StreamEnd; info: ConnectionInfo } {
    if (!isLoopbackDestination(host)) throw this.#refuseOutbound("connect", host ?? "", port);
    const acceptor = this.#listeners.get(port);
    if (!acceptor) {
      throw new AgentVmError(
        "ECONNREFUSED",
        `connect to port ${port} in VM ${this.#options.vmName}: nothing is listening there; start a server on that port first`,
      );
    }
    this.#checkCapacity("connect");
    const clientPort = this.#nextClientPort();
    const placeholder: StreamOwner = { data() {}, end() {}, close() {}, credit() {} };
    const [clientEnd, serverEnd] = StreamEnd.pair(client, placeholder, this.#options.limits.streamWindow, this.#streams);
    const serverInfo: ConnectionInfo = { localPort: port, remotePort: clientPort, remoteAddress: "127.0.0.1" };
    serverEnd.setOwner(acceptor(serverEnd, serverInfo));
    return { end: clientEnd, info: { localPort: clientPort, remotePort: port, remoteAddress: "127.0.0.1" } };
  }

  /**
   * Opens a real connection outside the VM, if the outbound policy allows it.
   * Bytes start flowing only when `start()` is called, so the caller can hand
   * the client its stream id first.
   */
  async connectOutbound(host: string, port: number, client: StreamOwner, pid: number): Promise<{ end: StreamEnd; info: ConnectionInfo; start(): void }> {
    if (!this.#options.outbound) throw this.#refuseOutbound("connect", host, port);
    this.#checkCapacity("connect");
    const socket = await this.#options.outbound.connect(host, port, pid);
    const bridge = realSocketOwner(socket);
    const [clientEnd, realEnd] = StreamEnd.pair(client, bridge.owner, this.#options.limits.streamWindow, this.#streams);
    return {
      end: clientEnd,
      info: { localPort: socket.localPort ?? 0, remotePort: port, remoteAddress: socket.remoteAddress ?? host },
      start: () => bridge.start(realEnd),
    };
  }

  /** A byte pipe that belongs to no port (a child process's stdio). */
  pipe(a: StreamOwner, b: StreamOwner): [StreamEnd, StreamEnd] {
    return StreamEnd.pair(a, b, this.#options.limits.streamWindow, this.#streams);
  }

  bindUdp(port: number, host: string | undefined, owner: UdpOwner): number {
    this.#checkBindAddress("bind", host, port);
    this.#checkCapacity("bind");
    if (port === 0) {
      const bound = this.#allocate(this.#udp, "bind", [EPHEMERAL_LOW, EPHEMERAL_HIGH]);
      this.#udp.set(bound, owner);
      return bound;
    }
    checkListenPort(this.#options.listen, port);
    if (this.#udp.has(port)) {
      throw new AgentVmError("EADDRINUSE", `bind UDP port ${port}: the port is already in use in VM ${this.#options.vmName}`);
    }
    this.#udp.set(port, owner);
    return port;
  }

  unbindUdp(port: number, owner: UdpOwner): void {
    if (this.#udp.get(port) === owner) this.#udp.delete(port);
  }

  /** Delivers a datagram. Like UDP, a datagram to a port nobody bound is dropped silently. */
  sendUdp(fromPort: number, host: string, port: number, data: Buffer, pid = 0): void {
    if (!isLoopbackDestination(host)) {
      if (this.#options.outbound) this.#options.outbound.checkUdp(host, port, pid);
      throw this.#refuseOutbound("udp", host, port);
    }
    this.#udp.get(port)?.message(data, { address: "127.0.0.1", port: fromPort });
  }

  #checkBindAddress(operation: string, host: string | undefined, port: number): void {
    if (!isLoopbackBind(host)) {
      throw new AgentVmError(
        "EADDRNOTAVAIL",
        `${operation} ${host}:${port}: a VM only has a loopback interface; bind 127.0.0.1, ::1, localhost, 0.0.0.0 or ::`,
      );
    }
  }

  #checkCapacity(operation: string): void {
    const { listeners, connections, udpSockets } = this.stats;
    const max = this.#options.limits.maxSockets;
    if (listeners + connections + udpSockets >= max) {
      throw new AgentVmError(
        "EMFILE",
        `${operation}: VM ${this.#options.vmName} already has ${max} sockets open (limits.maxSockets); close some first`,
      );
    }
  }

  #refuseOutbound(operation: "connect" | "udp", host: string, port: number): AgentVmError {
    return new AgentVmError("EACCES", `${operation} ${host}:${port} denied: VM ${this.#options.vmName} may only reach its own loopback (network policy default is deny)`);
  }

  #allocate(used: ReadonlyMap<number, unknown>, operation: string, range = autoRange(this.#options.listen)): number {
    const [low, high] = range;
    const size = high - low + 1;
    const start = low + Math.floor(Math.random() * size);
    for (let i = 0; i < size; i++) {
      const port = low + ((start - low + i) % size);
      if (!used.has(port)) return port;
    }
    const code: ErrorCode = "EADDRINUSE";
    throw new AgentVmError(code, `${operation} on port 0: every port in ${low}-${high} is in use in VM ${this.#options.vmName}`);
  }

  #nextClientPort(): number {
    const port = this.#nextEphemeral;
    this.#nextEphemeral = port >= EPHEMERAL_HIGH ? EPHEMERAL_LOW : port + 1;
    return port;
  }
}
