/**
 * Routes `net` to the VM kernel. Every TCP socket and server in a guest — and so
 * http, https, http2, tls, fetch (undici) and any npm client built on `net` — ends
 * up here, because the patch sits on `net.Socket.prototype` and
 * `net.Server.prototype` rather than on factory functions that other modules
 * may have captured.
 *
 * A patched socket keeps being a real `net.Socket` (so `instanceof`, timeouts,
 * `remoteAddress` and friends work); only its transport changes. Sockets that
 * have a real handle (stdio pipes, the kernel channel itself) are left alone.
 */
import net from "node:net";
import { CreditBatcher, WindowedWriter } from "./flow.ts";
import { systemError, type KernelClient, type StreamHandler } from "./kernel-client.ts";

const kKernel = Symbol("agentvm.kernelSocket");
const kServer = Symbol("agentvm.kernelServer");

interface KernelSocketState {
  id: number;
  writer: WindowedWriter | undefined;
  credit: CreditBatcher | undefined;
  /** Bytes pushed while the readable buffer was full, credited on the next _read. */
  held: number;
  /** Writes made before the connection was established. */
  early: { chunk: Buffer; callback: (error?: Error | null) => void }[];
  endRequested: (() => void) | undefined;
  local: { address: string; family: string; port: number };
  remote: { address: string; family: string; port: number };
  kernelClosed: boolean;
  refed: boolean;
}

interface KernelServerState {
  port: number;
  host: string | undefined;
  bound: boolean;
  refed: boolean;
}

/** Node's internals are reached through untyped fields (`_handle`, `_server`, …). */
type AnySocket = { [key: string | symbol]: any };
type AnyServer = { [key: string | symbol]: any };

/**
 * `autoRange` is the VM's listen(0) range ([low, high]); without it listen(0)
 * asks the kernel to choose, and address() reports port 0 until 'listening'.
 */
export function installNetPatch(kernel: KernelClient, autoRange?: [number, number]): void {
  const socketProto = net.Socket.prototype as unknown as AnySocket;
  const serverProto = net.Server.prototype as unknown as AnyServer;
  const original = {
    connect: socketProto.connect,
    _write: socketProto._write,
    _writev: socketProto._writev,
    _read: socketProto._read,
    _final: socketProto._final,
    _destroy: socketProto._destroy,
    _getpeername: socketProto._getpeername,
    _getsockname: socketProto._getsockname,
    ref: socketProto.ref,
    unref: socketProto.unref,
    listen: serverProto.listen,
  };
  const servers = new Map<number, AnyServer>();
  const normalizeArgs: (args: unknown[]) => [Record<string, any>, ((...a: unknown[]) => void) | null] = (net as any)._normalizeArgs;

  function state(socket: AnySocket): KernelSocketState | undefined {
    return socket[kKernel];
  }

  function newState(): KernelSocketState {
    return {
      id: 0,
      writer: undefined,
      credit: undefined,
      held: 0,
      early: [],
      endRequested: undefined,
      local: { address: "127.0.0.1", family: "IPv4", port: 0 },
      remote: { address: "127.0.0.1", family: "IPv4", port: 0 },
      kernelClosed: false,
      refed: true,
    };
  }

  /** Joins a socket to kernel stream `id` once the kernel has created it. */
  function attach(socket: AnySocket, st: KernelSocketState, id: number): void {
    st.id = id;
    st.writer = new WindowedWriter((chunk) => kernel.sendData(id, chunk));
    st.credit = new CreditBatcher((bytes) => kernel.sendCredit(id, bytes));
    const handler: StreamHandler = {
      data(chunk) {
        socket._unrefTimer?.();
        if (socket.push(chunk)) st.credit!.consumed(chunk.byteLength);
        else st.held += chunk.byteLength;
      },
      end() {
        socket.push(null);
        // As Node's own stream reader does on EOF: lets 'end' fire on a socket nobody reads.
        socket.read(0);
      },
      close(reset) {
        st.kernelClosed = true;
        st.writer!.abort(systemError({ code: "EPIPE", message: "the connection was closed" }, "write"));
        // As on a real socket, a reset after the peer's FIN only fails later writes (EPIPE): what was received still ends cleanly.
        if (reset && !socket.destroyed && !socket._readableState.ended) {
          socket.destroy(systemError({ code: "ECONNRESET", message: "the peer reset the connection" }, "read"));
        }
      },
      credit(bytes) {
        st.writer!.credit(bytes);
      },
    };
    kernel.openStream(id, handler);
    if (st.refed) kernel.ref();
    for (const { chunk, callback } of st.early.splice(0)) st.writer.write(chunk, callback);
    const end = st.endRequested;
    st.endRequested = undefined;
    end?.();
  }

  socketProto.connect = function connect(this: AnySocket, ...args: unknown[]) {
    if (this._handle) return original.connect.apply(this, args);
    const [options, callback] = Array.isArray(args[0]) && args.length === 1 ? (args[0] as [Record<string, any>, any]) : normalizeArgs(args);
    if (options.path) {
      process.nextTick(() =>
        this.destroy(
          systemError({ code: "EACCES", message: "unix domain sockets are not available inside the VM; use a TCP port on localhost" }, "connect", {
            address: String(options.path),
          }),
        ),
      );
      return this;
    }
    const port = Number(options.port);
    if (!Number.isInteger(port) || port < 0 || port > 65535 || options.port === "" || options.port === null) {
      const error = new RangeError(`Port should be >= 0 and < 65536. Received ${String(options.port)}.`) as RangeError & { code: string };
      error.code = "ERR_SOCKET_BAD_PORT";
      throw error;
    }
    const host: string = options.host ?? "localhost";
    if (this.destroyed) this._undestroy?.();
    if (callback) this.once("connect", callback);
    if (options.timeout) this.setTimeout(options.timeout);
    const st = newState();
    this[kKernel] = st;
    this.connecting = true;
    this._host = host;
    kernel.ref();
    kernel.request<{ id: number; localPort: number; remotePort: number; remoteAddress: string }>("connect", { host, port }, (error, reply) => {
      if (error) {
        kernel.unref();
        this.connecting = false;
        this.destroy(systemError(error, "connect", { address: host, port }));
        return;
      }
      kernel.unref();
      if (this.destroyed) {
        kernel.sendClose(reply.id);
        return;
      }
      st.local.port = reply.localPort;
      // The VM's loopback answers on both families; report the one the caller dialled.
      const v6 = net.isIPv6(host);
      if (v6) st.local = { address: "::1", family: "IPv6", port: reply.localPort };
      st.remote = v6 ? { address: "::1", family: "IPv6", port: reply.remotePort } : { address: reply.remoteAddress, family: "IPv4", port: reply.remotePort };
      this.connecting = false;
      attach(this, st, reply.id);
      this.emit("connect");
      this.emit("ready");
    });
    return this;
  };

  socketProto._write = function _write(this: AnySocket, chunk: Buffer | string, encoding: BufferEncoding, callback: (error?: Error | null) => void) {
    const st = state(this);
    if (!st) return original._write.call(this, chunk, encoding, callback);
    const bytes = typeof chunk === "string" ? Buffer.from(chunk, encoding) : chunk;
    this._unrefTimer?.();
    if (st.kernelClosed) return callback(systemError({ code: "EPIPE", message: "the connection was closed" }, "write"));
    if (!st.writer) st.early.push({ chunk: bytes, callback });
    else st.writer.write(bytes, callback);
  };

  socketProto._writev = function _writev(this: AnySocket, chunks: { chunk: Buffer | string; encoding: BufferEncoding }[], callback: (error?: Error | null) => void) {
    if (!state(this)) return original._writev.call(this, chunks, callback);
    const joined = Buffer.concat(chunks.map(({ chunk, encoding }) => (typeof chunk === "string" ? Buffer.from(chunk, encoding) : chunk)));
    return socketProto._write.call(this, joined, "buffer" as BufferEncoding, callback);
  };

  socketProto._read = function _read(this: AnySocket, size: number) {
    const st = state(this);
    if (!st) return original._read.call(this, size);
    if (st.held > 0 && st.credit) {
      st.credit.consumed(st.held);
      st.held = 0;
    }
  };

  socketProto._final = function _final(this: AnySocket, callback: (error?: Error | null) => void) {
    const st = state(this);
    if (!st) return original._final.call(this, callback);
    const finish = () => {
      if (!st.kernelClosed) kernel.sendEnd(st.id);
      callback();
    };
    if (st.writer) finish();
    else st.endRequested = finish;
  };

  socketProto._destroy = function _destroy(this: AnySocket, error: Error | null, callback: (error?: Error | null) => void) {
    const st = state(this);
    if (!st) return original._destroy.call(this, error, callback);
    this.connecting = false;
    this.setTimeout(0);
    if (st.writer) {
      st.credit!.flush();
      if (!st.kernelClosed) kernel.sendClose(st.id);
      kernel.forgetStream(st.id);
      st.writer.abort(error ?? systemError({ code: "EPIPE", message: "the socket was destroyed" }, "write"));
      if (st.refed) kernel.unref();
    }
    st.kernelClosed = true;
    const server = this._server as AnyServer | null;
    if (server) {
      server._connections--;
      server._emitCloseIfDrained?.();
    }
    callback(error);
    process.nextTick(() => this.emit("close", Boolean(error)));
  };

  socketProto._getpeername = function _getpeername(this: AnySocket) {
    const st = state(this);
    return st ? (st.writer ? { ...st.remote } : {}) : original._getpeername.call(this);
  };

  socketProto._getsockname = function _getsockname(this: AnySocket) {
    const st = state(this);
    return st ? { ...st.local } : original._getsockname.call(this);
  };

  socketProto.ref = function ref(this: AnySocket) {
    const st = state(this);
    if (!st) return original.ref.call(this);
    if (!st.refed) {
      st.refed = true;
      if (st.writer && !st.kernelClosed) kernel.ref();
    }
    return this;
  };

  socketProto.unref = function unref(this: AnySocket) {
    const st = state(this);
    if (!st) return original.unref.call(this);
    if (st.refed) {
      st.refed = false;
      if (st.writer && !st.kernelClosed) kernel.unref();
    }
    return this;
  };

  function acceptOn(server: AnyServer, event: Record<string, unknown>): void {
    const id = Number(event.id);
    const srv = server[kServer] as KernelServerState;
    if (server.maxConnections !== undefined && server._connections >= server.maxConnections) {
      kernel.sendClose(id);
      return;
    }
    const socket = new net.Socket({ allowHalfOpen: server.allowHalfOpen, pauseOnCreate: server.pauseOnConnect } as net.SocketConstructorOpts) as unknown as AnySocket;
    const st = newState();
    st.local.port = srv.port;
    st.remote = { address: String(event.remoteAddress), family: "IPv4", port: Number(event.remotePort) };
    socket[kKernel] = st;
    attach(socket, st, id);
    if (server.noDelay) socket.setNoDelay(true);
    server._connections++;
    socket.server = server;
    socket._server = server;
    server.emit("connection", socket);
  }

  kernel.onEvent("accept", (event) => {
    const server = servers.get(Number(event.port));
    if (server) acceptOn(server, event);
    else kernel.sendClose(Number(event.id));
  });

  serverProto.listen = function listen(this: AnyServer, ...args: unknown[]) {
    const [options, callback] = normalizeArgs(args);
    if (options.handle !== undefined || options.fd !== undefined || options.path || (args[0] && typeof args[0] === "object" && ("_handle" in (args[0] as object) || "fd" in (args[0] as object)))) {
      if (options.port === undefined) {
        const error = systemError({ code: "EACCES", message: "only TCP ports on localhost can be listened on inside the VM" }, "listen", {
          address: String(options.path ?? "handle"),
        });
        process.nextTick(() => this.emit("error", error));
        return this;
      }
    }
    if (this._handle) {
      const error = new Error("Listen method has been called more than once without closing.") as Error & { code: string };
      error.code = "ERR_SERVER_ALREADY_LISTEN";
      throw error;
    }
    // listen(cb) and listen(null, cb) pick a port, as in Node (normalizeArgs puts the callback in options.port).
    const omitted = options.port === undefined || options.port === null || typeof args[0] === "function";
    const requested = omitted ? 0 : Number(options.port);
    if (!Number.isInteger(requested) || requested < 0 || requested > 65535) {
      const error = new RangeError(`options.port should be >= 0 and < 65536. Received ${String(options.port)}.`) as RangeError & { code: string };
      error.code = "ERR_SOCKET_BAD_PORT";
      throw error;
    }
    const host: string | undefined = options.host ?? undefined;
    const family = host && host.includes(":") ? "IPv6" : host === undefined ? "IPv6" : "IPv4";
    const address = host === undefined || host === "::" ? "::" : host === "localhost" ? "127.0.0.1" : host;
    // For listen(0) the guest picks the port itself, from the VM's allocation range, so that
    // server.address() right after listen() already answers (supertest and many test suites
    // read it synchronously). The kernel still decides; a taken port means another pick.
    const picked = requested === 0 ? pickPort() : undefined;
    const srv: KernelServerState = { port: picked ?? requested, host, bound: false, refed: true };
    this[kServer] = srv;
    const server = this;
    this._handle = {
      fd: -1,
      getsockname(out: Record<string, unknown>) {
        out.address = address;
        out.family = family;
        out.port = srv.port;
        return 0;
      },
      close() {
        if (srv.bound) {
          servers.delete(srv.port);
          void kernel.call("unlisten", { port: srv.port }).catch(() => {});
          if (srv.refed) kernel.unref();
        }
        srv.bound = false;
      },
      ref() {
        if (!srv.refed && srv.bound) kernel.ref();
        srv.refed = true;
      },
      unref() {
        if (srv.refed && srv.bound) kernel.unref();
        srv.refed = false;
      },
    };
    this._connectionKey = `${family === "IPv6" ? 6 : 4}:${address}:${srv.port}`;
    if (typeof callback === "function") this.once("listening", callback);
    kernel.ref();
    let attempts = 0;
    const ask = (port: number) => kernel.request<{ port: number }>("listen", { port, host }, (error, reply) => {
      if (error && port !== 0 && picked !== undefined && (error.code === "EADDRINUSE" || error.code === "EACCES")) {
        srv.port = ++attempts < PICK_ATTEMPTS ? (pickPort() ?? 0) : 0;
        return ask(srv.port);
      }
      if (error) {
        kernel.unref();
        if (server[kServer] === srv) {
          server._handle = null;
          server._connectionKey = undefined;
        }
        const failure = systemError(error, "listen", { address, port: requested });
        process.nextTick(() => server.emit("error", failure));
        return;
      }
      kernel.unref();
      if (server[kServer] !== srv || !server._handle) {
        void kernel.call("unlisten", { port: reply.port }).catch(() => {});
        return;
      }
      srv.port = reply.port;
      srv.bound = true;
      if (srv.refed) kernel.ref();
      servers.set(reply.port, server);
      server._connectionKey = `${family === "IPv6" ? 6 : 4}:${address}:${reply.port}`;
      // 'listening' is emitted on the next tick, as Node does; accepts may already arrive.
      process.nextTick(() => server.emit("listening"));
    });
    ask(srv.port);
    return this;
  };

  /** A free-looking port from the VM's listen(0) range, or undefined to let the kernel choose. */
  function pickPort(): number | undefined {
    if (!autoRange || autoRange[0] > autoRange[1]) return undefined;
    const [low, high] = autoRange;
    for (let i = 0; i < 16; i++) {
      const port = low + Math.floor(Math.random() * (high - low + 1));
      if (!servers.has(port)) return port;
    }
    return undefined;
  }
}

/** Picks before the kernel says the range is exhausted; the last attempt lets the kernel choose. */
const PICK_ATTEMPTS = 8;
