/**
 * Loaded into every Node.js program of a VM (NODE_OPTIONS --require). Not a
 * boundary — the VM's network namespace and init's policy are — but the
 * contract Node programs had, with real sockets:
 *
 * - A TCP connection beyond the VM is asked of init first (guest-service.ts);
 *   the server decides it by the network policy and opens it, then the
 *   program's own socket connects to it through init. A denial is an EACCES
 *   error on that socket naming the destination and the rule, before any byte.
 *   fetch, http(s), tls and database drivers all connect through here.
 * - dns.lookup of a name beyond the VM is answered the same way (EACCES when
 *   the policy refuses the name; nothing is resolved then).
 * - server.listen on a refused port is EACCES naming the rule (privileged,
 *   outside listen.portMin/portMax, or a listen rule), as the kernel would
 *   refuse it but with the reason.
 *
 * Everything else about sockets is Node's own.
 */
import type * as Dgram from "node:dgram";
import type * as Dns from "node:dns";
import type * as Net from "node:net";

// CommonJS on purpose: --require of an ES module starts Node's ESM loader in
// every program, which cost ~5 ms of start-up and ~1.6 MB per process.
const dgram: typeof Dgram = require("node:dgram");
const dns: typeof Dns = require("node:dns");
const net: typeof Net = require("node:net");
const { readFileSync }: typeof import("node:fs") = require("node:fs");
const { syncBuiltinESMExports }: typeof import("node:module") = require("node:module");

/** Written by the server for this VM: refused listen ports as [from, to, message with {port}]. */
const CONFIG_FILE = "/run/agentvm-guest.json";

interface GuestConfig {
  /** init's guest service on the VM's loopback (EGRESS_PORTS.node); 0 when there is no config (not in a VM). */
  servicePort: number;
  listenDenials: [number, number, string][];
  /** Where listen(0) allocates (the VM's ip_local_port_range); empty when low > high. */
  autoRange: [number, number];
}

const config: GuestConfig = (() => {
  try {
    return JSON.parse(readFileSync(CONFIG_FILE, "utf8")) as GuestConfig;
  } catch {
    return { servicePort: 0, listenDenials: [], autoRange: [1024, 65535] };
  }
})();

const SERVICE = { host: "127.0.0.1", port: config.servicePort };

function isLocal(host: string | undefined): boolean {
  if (host === undefined || host === "") return true;
  const name = host.toLowerCase().replace(/^\[|\]$/g, "");
  if (name === "localhost" || name.endsWith(".localhost") || name === "::1" || name === "::" || name === "0.0.0.0") return true;
  if (net.isIPv4(name)) return name.startsWith("127.");
  return /^::ffff:127\./.test(name);
}

/** Shaped like Node's own errors: "connect EACCES example.com:443 (why)". */
function failure(syscall: string, code: string, target: string, why: string, fields: Record<string, unknown> = {}): NodeJS.ErrnoException {
  return Object.assign(new Error(`${syscall} ${code} ${target} (${why})`), { code, syscall, ...(code === "EACCES" ? { errno: -13 } : {}), ...fields });
}

/** One request to init's guest service: a JSON line out, a JSON line back. */
function ask(request: object): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const socket = (originalConnect as (options: Net.TcpSocketConnectOpts) => Net.Socket).call(new net.Socket(), SERVICE);
    let text = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => (text += chunk));
    const target = `${SERVICE.host}:${SERVICE.port}`;
    socket.once("error", (error) => reject(failure("connect", "ECONNREFUSED", target, `the VM's network service did not answer: ${error.message}`)));
    socket.once("end", () => {
      try {
        resolve(JSON.parse(text) as Record<string, unknown>);
      } catch {
        reject(failure("connect", "ECONNRESET", target, "the VM's network service closed without an answer"));
      }
    });
    socket.end(`${JSON.stringify({ ...request, pid: process.pid })}\n`);
  });
}

const originalConnect = net.Socket.prototype.connect;

/** The (options, callback) Node's own connect derives from its overloads; a unix path passes through. */
function connectOptions(args: unknown[]): { options: Net.TcpSocketConnectOpts; callback?: () => void } | undefined {
  const [first, second, third] = args;
  const callback = [second, third].find((value) => typeof value === "function") as (() => void) | undefined;
  if (Array.isArray(first)) return connectOptions(first); // Node passes normalized args through tls
  if (typeof first === "object" && first !== null) {
    // As in Node: a truthy path is a unix socket (http passes path: null for TCP).
    if ((first as { path?: unknown }).path) return undefined;
    return { options: first as Net.TcpSocketConnectOpts, ...(callback ? { callback } : {}) };
  }
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    return { options: { port: Number(first), ...(typeof second === "string" ? { host: second } : {}) }, ...(callback ? { callback } : {}) };
  }
  return undefined;
}

net.Socket.prototype.connect = function connect(this: Net.Socket, ...args: unknown[]): Net.Socket {
  const parsed = connectOptions(args);
  if (!parsed || isLocal(parsed.options.host)) return (originalConnect as (...a: unknown[]) => Net.Socket).apply(this, args);
  const { options, callback } = parsed;
  const host = options.host!.replace(/^\[|\]$/g, "");
  const port = Number(options.port);
  if (callback) this.once("connect", callback);
  // Writes made now wait for 'connect', as they do while Node resolves a name.
  (this as { connecting: boolean }).connecting = true;
  ask({ op: "connect", host, port }).then(
    (reply) => {
      if (this.destroyed) return;
      if (reply.ok !== true || typeof reply.via !== "string") {
        const code = typeof reply.code === "string" ? reply.code : "ECONNREFUSED";
        this.destroy(failure("connect", code, `${host}:${port}`, String(reply.message ?? "failed"), { address: host, port }));
        return;
      }
      const { lookup: _lookup, ...rest } = options;
      (originalConnect as (options: Net.TcpSocketConnectOpts) => Net.Socket).call(this, { ...rest, host: SERVICE.host, port: SERVICE.port, localAddress: reply.via, family: 4 });
    },
    (error: Error) => this.destroy(error),
  );
  return this;
};

const originalLookup = dns.lookup;
type LookupCallback = (error: NodeJS.ErrnoException | null, address?: string | Dns.LookupAddress[], family?: number) => void;

function lookup(hostname: string, options: unknown, callback?: unknown): void {
  const done = (typeof options === "function" ? options : callback) as LookupCallback;
  const opts = (typeof options === "object" && options !== null ? options : typeof options === "number" ? { family: options } : {}) as Dns.LookupOptions;
  if (typeof hostname !== "string" || isLocal(hostname) || net.isIP(hostname) !== 0 || typeof done !== "function") {
    return (originalLookup as (...a: unknown[]) => void)(hostname, options, callback);
  }
  const family = opts.family === 4 || opts.family === "IPv4" ? 4 : opts.family === 6 || opts.family === "IPv6" ? 6 : 0;
  ask({ op: "resolve", name: hostname, family }).then((reply) => {
    const found = reply.ok === true && Array.isArray(reply.addresses) ? (reply.addresses as { address: string; family: number }[]) : [];
    if (found.length === 0) {
      const code = reply.ok !== true && typeof reply.code === "string" ? reply.code : "ENOTFOUND";
      return done(failure("getaddrinfo", code, hostname, String(reply.message ?? "no address"), { hostname }));
    }
    if (opts.all) done(null, found);
    else done(null, found[0]!.address, found[0]!.family);
  }, (error: NodeJS.ErrnoException) => done(error));
}
dns.lookup = lookup as typeof dns.lookup;
dns.promises.lookup = ((hostname: string, options?: Dns.LookupOptions) =>
  new Promise((resolve, reject) =>
    lookup(hostname, options ?? {}, (error: NodeJS.ErrnoException | null, address?: string | Dns.LookupAddress[], family?: number) =>
      error ? reject(error) : resolve(Array.isArray(address) ? address : { address: address!, family: family! }),
    ),
  )) as typeof dns.promises.lookup;

const originalSend = dgram.Socket.prototype.send;
/** UDP beyond the VM: the server decides (and audits) it, and relays none, so the send fails with its EACCES. */
dgram.Socket.prototype.send = function send(this: Dgram.Socket, ...args: unknown[]): void {
  const portIndex = args.findIndex((arg, i) => i > 0 && typeof arg === "number" && typeof args[i + 1] === "string");
  const host = portIndex === -1 ? undefined : (args[portIndex + 1] as string);
  if (host === undefined || isLocal(host)) return (originalSend as (...a: unknown[]) => void).apply(this, args);
  const port = args[portIndex] as number;
  const callback = args.find((arg) => typeof arg === "function") as ((error: Error | null) => void) | undefined;
  const refuse = (why: string, code = "EACCES") => {
    const error = failure("send", code, `${host}:${port}`, why, { address: host, port });
    if (callback) callback(error);
    else this.emit("error", error);
  };
  ask({ op: "udp", host, port }).then(
    (reply) => refuse(String(reply.message ?? "refused"), typeof reply.code === "string" ? reply.code : "EACCES"),
    (error: Error) => refuse(error.message),
  );
};

const originalListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listen(this: Net.Server, ...args: unknown[]): Net.Server {
  const [first] = args;
  const raw = typeof first === "object" && first !== null && !("_handle" in first) && !("fd" in first) ? (first as { port?: unknown; path?: unknown }).port : first;
  const port = typeof raw === "number" || (typeof raw === "string" && /^\d+$/.test(raw)) ? Number(raw) : undefined;
  const denied = port !== undefined && port > 0 ? config.listenDenials.find(([from, to]) => port >= from && port <= to) : undefined;
  if (denied) {
    const message = denied[2].replaceAll("{port}", String(port));
    process.nextTick(() => this.emit("error", failure("listen", "EACCES", `port ${port}`, message, { port })));
    return this;
  }
  if (port === 0 || (port === undefined && typeof raw !== "string")) {
    const [low, high] = config.autoRange;
    const why = `every port of the VM's listen range ${low}-${high} is taken (listen.portMin/portMax)`;
    if (low > high) {
      process.nextTick(() => this.emit("error", failure("listen", "EADDRINUSE", "port 0", `the VM's listen range leaves no port for listen(0): ${low}-${high}`, { port: 0 })));
      return this;
    }
    // The kernel allocates in the range; when it is full, say which range.
    const explain = (error: NodeJS.ErrnoException) => {
      if (error.code === "EADDRINUSE") error.message = `${error.message} (${why})`;
    };
    this.prependOnceListener("error", explain);
    this.once("listening", () => this.off("error", explain));
  }
  return (originalListen as (...a: unknown[]) => Net.Server).apply(this, args);
};

syncBuiltinESMExports();
