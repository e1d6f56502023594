/**
 * UDP in a guest, on the VM's loopback. `dgram.Socket` keeps its API; bind and
 * send go to the kernel, which delivers datagrams between the VM's sockets and
 * applies the network policy to any other destination. Sends are kernel calls
 * so each send's callback learns its own outcome; received datagrams arrive as
 * DGRAM frames.
 */
import dgram from "node:dgram";
import { isIP } from "node:net";
import { systemError, type KernelCallError, type KernelClient } from "./kernel-client.ts";

const kUdp = Symbol("agentvm.udp");

interface UdpState {
  id: number | undefined;
  port: number;
  address: string;
  bound: Promise<void> | undefined;
  closed: boolean;
  refed: boolean;
  remote: { address: string; port: number } | undefined;
}

type AnyUdp = { [key: string | symbol]: any };

function bytesOf(message: unknown, offset?: number, length?: number): Buffer {
  const parts = Array.isArray(message) ? message : [message];
  const buffer = Buffer.concat(
    parts.map((part) =>
      typeof part === "string" ? Buffer.from(part) : ArrayBuffer.isView(part) ? Buffer.from(part.buffer, part.byteOffset, part.byteLength) : Buffer.from(String(part)),
    ),
  );
  return offset === undefined ? buffer : buffer.subarray(offset, offset + (length ?? buffer.byteLength - offset));
}

export function installDgramPatch(kernel: KernelClient): void {
  const proto = dgram.Socket.prototype as unknown as AnyUdp;
  const originalClose = proto.close;

  function state(socket: AnyUdp): UdpState {
    socket[kUdp] ??= { id: undefined, port: 0, address: "0.0.0.0", bound: undefined, closed: false, refed: true, remote: undefined } satisfies UdpState;
    return socket[kUdp];
  }

  function bind(socket: AnyUdp, port: number, address: string | undefined): Promise<void> {
    const st = state(socket);
    st.bound = new Promise<void>((resolve, reject) => {
      // A synchronous reply: a datagram may follow the bind reply in the same read.
      kernel.request<{ id: number; port: number }>("udpBind", { port, host: address }, (error, reply) => {
        if (error) {
          st.bound = undefined;
          const shaped = systemError(error, "bind", { address: address ?? "0.0.0.0", port });
          socket.emit("error", shaped);
          reject(shaped);
          return;
        }
        st.id = reply.id;
        st.port = reply.port;
        st.address = address && isIP(address) ? address : "0.0.0.0";
        if (st.closed) {
          void kernel.call("udpClose", { id: reply.id }).catch(() => {});
          resolve();
          return;
        }
        if (st.refed) kernel.ref();
        kernel.onDatagram(reply.id, (header, data) => {
          socket.emit("message", data, { address: String(header.address), family: "IPv4", port: Number(header.port), size: data.byteLength });
        });
        resolve();
        process.nextTick(() => socket.emit("listening"));
      });
    });
    st.bound.catch(() => {});
    return st.bound;
  }

  proto.bind = function (this: AnyUdp, ...args: unknown[]) {
    const callback = typeof args.at(-1) === "function" ? (args.pop() as () => void) : undefined;
    const first = args[0];
    const options = first && typeof first === "object" ? (first as { port?: number; address?: string }) : { port: first as number | undefined, address: args[1] as string | undefined };
    if (state(this).bound) {
      const error = new Error("Socket is already bound") as Error & { code: string };
      error.code = "ERR_SOCKET_ALREADY_BOUND";
      throw error;
    }
    if (callback) this.once("listening", callback);
    void bind(this, Number(options.port ?? 0), options.address);
    return this;
  };

  proto.send = function (this: AnyUdp, message: unknown, ...rest: unknown[]) {
    const callback = typeof rest.at(-1) === "function" ? (rest.pop() as (error: Error | null, bytes?: number) => void) : undefined;
    const st = state(this);
    let offset: number | undefined;
    let length: number | undefined;
    if (typeof rest[0] === "number" && typeof rest[1] === "number" && rest.length >= 3) {
      offset = rest.shift() as number;
      length = rest.shift() as number;
    }
    const port = (rest[0] as number | undefined) ?? st.remote?.port;
    const host = (rest[1] as string | undefined) ?? st.remote?.address ?? "localhost";
    const data = bytesOf(message, offset, length);
    const ready = st.bound ?? bind(this, 0, undefined);
    ready
      .then(() => kernel.call("udpSend", { id: st.id, host, port, data: data.toString("base64") }))
      .then(
        () => callback?.(null, data.byteLength),
        (error: KernelCallError & { syscall?: string }) => {
          const shaped = error.syscall ? error : systemError(error, "send", { address: host, port: Number(port) });
          if (callback) callback(shaped);
          else this.emit("error", shaped);
        },
      );
  };

  proto.connect = function (this: AnyUdp, port: number, address?: unknown, callback?: () => void) {
    const cb = typeof address === "function" ? (address as () => void) : callback;
    const st = state(this);
    st.remote = { address: typeof address === "string" ? address : "127.0.0.1", port };
    const ready = st.bound ?? bind(this, 0, undefined);
    ready.then(() => {
      this.emit("connect");
      cb?.();
    }, () => {});
  };

  proto.disconnect = function (this: AnyUdp) {
    state(this).remote = undefined;
  };

  proto.remoteAddress = function (this: AnyUdp) {
    const remote = state(this).remote;
    if (!remote) {
      const error = new Error("Not connected") as Error & { code: string };
      error.code = "ERR_SOCKET_DGRAM_NOT_CONNECTED";
      throw error;
    }
    return { address: remote.address, family: "IPv4", port: remote.port };
  };

  proto.address = function (this: AnyUdp) {
    const st = state(this);
    if (st.id === undefined) {
      const error = new Error("getsockname EBADF") as Error & { code: string };
      error.code = "EBADF";
      throw error;
    }
    return { address: st.address, family: st.address.includes(":") ? "IPv6" : "IPv4", port: st.port };
  };

  proto.close = function (this: AnyUdp, callback?: () => void) {
    const st = state(this);
    if (st.closed) return this;
    st.closed = true;
    if (callback) this.once("close", callback);
    if (st.id !== undefined) {
      kernel.onDatagram(st.id, undefined);
      void kernel.call("udpClose", { id: st.id }).catch(() => {});
      if (st.refed) kernel.unref();
    }
    try {
      originalClose.call(this);
    } catch {
      process.nextTick(() => this.emit("close"));
    }
    return this;
  };

  proto.ref = function (this: AnyUdp) {
    const st = state(this);
    if (!st.refed && st.id !== undefined && !st.closed) kernel.ref();
    st.refed = true;
    return this;
  };

  proto.unref = function (this: AnyUdp) {
    const st = state(this);
    if (st.refed && st.id !== undefined && !st.closed) kernel.unref();
    st.refed = false;
    return this;
  };

  for (const name of ["setBroadcast", "setTTL", "setMulticastTTL", "setMulticastLoopback", "setMulticastInterface", "setRecvBufferSize", "setSendBufferSize"]) {
    proto[name] = function (this: AnyUdp) {
      return this;
    };
  }
}
