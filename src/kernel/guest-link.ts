/**
 * The kernel's side of one guest process's channel: it answers the guest's calls
 * (listen, connect, dns, udp, spawn, kill) against the VM's socket and process
 * tables, and maps the guest's stream ids to kernel StreamEnds.
 *
 * Everything a guest sends is untrusted: unknown ops, ids it does not own, or
 * writes past its window end that stream (or, for framing errors, the guest)
 * without touching anything else in the VM.
 */
import { AgentVmError } from "../errors.ts";
import { FrameChannel } from "../guest/channel.ts";
import {
  encodeCredit,
  encodeDgram,
  encodeHeader,
  encodeJson,
  FrameType,
  parseJson,
  type Frame,
} from "../guest/protocol.ts";
import type { Duplex } from "node:stream";
import type { SocketTable, Acceptor, UdpOwner } from "./socket-table.ts";
import { isLoopbackDestination } from "./addresses.ts";
import type { StreamEnd, StreamOwner } from "./stream.ts";

/** What a guest may ask of the process table (spawn a sibling, signal one). */
export interface ProcessServices {
  spawnChild(parent: GuestLink, request: Record<string, unknown>): Promise<unknown>;
  killChild(parent: GuestLink, pid: number, signal: string): void;
  resolve(hostname: string, pid: number): Promise<{ address: string; family: 4 | 6 }[]>;
}

export interface GuestLinkEvents {
  /** The guest finished booting and waits for its program. */
  ready(): void;
  /** The channel broke (the process died, or the guest broke the protocol). */
  closed(error?: Error): void;
}

export class GuestLink {
  readonly channel: FrameChannel;
  readonly #sockets: SocketTable;
  readonly #services: ProcessServices;
  /** Replaced when a pooled guest is handed to a process. */
  events: GuestLinkEvents;
  /** The VM pid of the process on this link (0 until it runs), for audit lines. */
  pid = 0;
  readonly #streams = new Map<number, StreamEnd>();
  readonly #listeners = new Map<number, Acceptor>();
  readonly #udp = new Map<number, { port: number; owner: UdpOwner }>();
  #nextId = 1;

  constructor(pipe: Duplex, sockets: SocketTable, services: ProcessServices, events: GuestLinkEvents) {
    this.#sockets = sockets;
    this.#services = services;
    this.events = events;
    this.channel = new FrameChannel(
      pipe,
      (frame) => this.#onFrame(frame),
      (error) => this.#onClosed(error),
    );
  }

  /** Sends a kernel event (accept, child exit, run) to the guest. */
  event(value: Record<string, unknown>): void {
    this.channel.send(encodeJson(FrameType.EVENT, 0, value));
  }

  /** Gives the guest one end of a stream and returns the id it will know it by. */
  adopt(bind: (owner: StreamOwner) => StreamEnd): number {
    const id = this.#allocateId();
    const end = bind(this.#ownerFor(id));
    this.#streams.set(id, end);
    return id;
  }

  /** Ends every socket of this guest, as process exit does on a real kernel. */
  releaseAll(): void {
    for (const end of this.#streams.values()) end.reset();
    this.#streams.clear();
    for (const [port, acceptor] of this.#listeners) this.#sockets.unlisten(port, acceptor);
    this.#listeners.clear();
    for (const { port, owner } of this.#udp.values()) this.#sockets.unbindUdp(port, owner);
    this.#udp.clear();
  }

  #onClosed(error?: Error): void {
    this.releaseAll();
    this.events.closed(error);
  }

  #allocateId(): number {
    const id = this.#nextId;
    this.#nextId = id >= 0x7fffffff ? 1 : id + 1;
    return id;
  }

  #ownerFor(id: number): StreamOwner {
    const channel = this.channel;
    return {
      data: (chunk) => {
        channel.send(encodeHeader(FrameType.DATA, id, chunk.byteLength));
        channel.send(chunk);
      },
      end: () => channel.send(encodeHeader(FrameType.END, id, 0)),
      close: (reset) => {
        this.#streams.delete(id);
        channel.send(encodeJson(FrameType.CLOSE, id, { reset }));
      },
      credit: (bytes) => channel.send(encodeCredit(id, bytes)),
    };
  }

  #onFrame(frame: Frame): void {
    switch (frame.type) {
      case FrameType.CALL:
        void this.#answer(frame.id, frame.payload);
        return;
      case FrameType.EVENT: {
        const event = parseJson(frame.payload) as { type?: string };
        if (event.type === "ready") this.events.ready();
        return;
      }
      case FrameType.DATA:
        this.#stream(frame.id)?.write(frame.payload);
        return;
      case FrameType.END:
        this.#stream(frame.id)?.end();
        return;
      case FrameType.CREDIT:
        this.#stream(frame.id)?.credit(frame.payload.readUInt32LE(0));
        return;
      case FrameType.CLOSE: {
        const end = this.#streams.get(frame.id);
        this.#streams.delete(frame.id);
        end?.close();
        return;
      }
      default:
        this.channel.close(new AgentVmError("PROTOCOL_VIOLATION", `unknown frame type ${frame.type}`));
    }
  }

  #stream(id: number): StreamEnd | undefined {
    // A frame for a stream that already closed is normal (it crossed the close in flight).
    return this.#streams.get(id);
  }

  async #answer(requestId: number, payload: Buffer): Promise<void> {
    let reply: unknown;
    let after: (() => void) | undefined;
    try {
      const request = parseJson(payload) as Record<string, unknown>;
      const result = (await this.#call(request)) as { reply?: unknown; after?: () => void } | undefined;
      if (result && typeof result === "object" && "after" in result) {
        reply = result.reply;
        after = result.after;
      } else {
        reply = result;
      }
    } catch (error) {
      const shaped = AgentVmError.from(error);
      reply = { error: { code: shaped.code, message: shaped.message } };
    }
    this.channel.send(encodeJson(FrameType.REPLY, requestId, reply ?? {}));
    // Work that must follow the reply on the channel (bytes of a new stream).
    after?.();
  }

  async #call(request: Record<string, unknown>): Promise<unknown> {
    switch (request.op) {
      case "listen":
        return this.#listen(request);
      case "unlisten": {
        const port = Number(request.port);
        const acceptor = this.#listeners.get(port);
        if (acceptor) this.#sockets.unlisten(port, acceptor);
        this.#listeners.delete(port);
        return {};
      }
      case "connect":
        return this.#connect(request);
      case "lookup":
        return { addresses: await this.#services.resolve(String(request.hostname ?? ""), this.pid) };
      case "udpBind":
        return this.#bindUdp(request);
      case "udpSend": {
        const socket = this.#udp.get(Number(request.id));
        if (!socket) throw new AgentVmError("EINVAL", "send on a UDP socket that is not bound");
        const data = Buffer.from(String(request.data ?? ""), "base64");
        this.#sockets.sendUdp(socket.port, String(request.host ?? "127.0.0.1"), Number(request.port), data, this.pid);
        return {};
      }
      case "udpClose": {
        const id = Number(request.id);
        const socket = this.#udp.get(id);
        if (socket) this.#sockets.unbindUdp(socket.port, socket.owner);
        this.#udp.delete(id);
        return {};
      }
      case "spawn":
        return this.#services.spawnChild(this, request);
      case "kill":
        this.#services.killChild(this, Number(request.pid), String(request.signal ?? "SIGTERM"));
        return {};
      default:
        throw new AgentVmError("PROTOCOL_VIOLATION", `unknown kernel call ${JSON.stringify(request.op)}`);
    }
  }

  #listen(request: Record<string, unknown>): { port: number } {
    const host = typeof request.host === "string" ? request.host : undefined;
    const acceptor: Acceptor = (end, info) => {
      const id = this.#allocateId();
      this.#streams.set(id, end);
      this.event({ type: "accept", port: bound, id, remotePort: info.remotePort, remoteAddress: info.remoteAddress });
      return this.#ownerFor(id);
    };
    const bound = this.#sockets.listen(Number(request.port ?? 0), host, acceptor, this.pid);
    this.#listeners.set(bound, acceptor);
    return { port: bound };
  }

  async #connect(request: Record<string, unknown>): Promise<unknown> {
    const id = this.#allocateId();
    const host = typeof request.host === "string" ? request.host : undefined;
    const port = Number(request.port);
    if (isLoopbackDestination(host)) {
      const { end, info } = this.#sockets.connect(host, port, this.#ownerFor(id));
      this.#streams.set(id, end);
      return { id, ...info };
    }
    const { end, info, start } = await this.#sockets.connectOutbound(host!, port, this.#ownerFor(id), this.pid);
    if (this.channel.closed) {
      end.reset();
      return {};
    }
    this.#streams.set(id, end);
    return { reply: { id, ...info }, after: start };
  }

  #bindUdp(request: Record<string, unknown>): unknown {
    const id = this.#allocateId();
    const owner: UdpOwner = {
      message: (data, from) => this.channel.send(encodeDgram(id, from, data)),
    };
    const host = typeof request.host === "string" ? request.host : undefined;
    const port = this.#sockets.bindUdp(Number(request.port ?? 0), host, owner);
    this.#udp.set(id, { port, owner });
    return { id, port };
  }
}
