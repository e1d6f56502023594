/**
 * The guest's end of its kernel channel: request/reply calls, byte streams with
 * credit-based flow control, datagrams and kernel events.
 *
 * The pipe is unref'd whenever nothing is waiting on the kernel, so a guest
 * program exits when its own work is done, exactly as it would on a real host.
 */
import * as net from "node:net";
import { constants as osConstants } from "node:os";
import { FrameChannel } from "./channel.ts";
import {
  decodeDgram,
  encodeCredit,
  encodeDgram,
  encodeHeader,
  encodeJson,
  FrameType,
  parseJson,
  type Frame,
} from "./protocol.ts";

export interface StreamHandler {
  data(chunk: Buffer): void;
  end(): void;
  close(reset: boolean): void;
  credit(bytes: number): void;
}

export interface KernelErrorShape {
  code: string;
  message: string;
}

/** A Node-style system error, as net/dns would raise it. */
export function systemError(shape: KernelErrorShape, syscall: string, details: { address?: string; port?: number; hostname?: string } = {}): NodeJS.ErrnoException {
  const target = details.hostname ?? (details.address !== undefined ? `${details.address}${details.port !== undefined ? `:${details.port}` : ""}` : "");
  const error = new Error(`${syscall} ${shape.code}${target ? ` ${target}` : ""} (${shape.message})`) as NodeJS.ErrnoException & Record<string, unknown>;
  error.code = shape.code;
  const errno = (osConstants.errno as Record<string, number>)[shape.code];
  if (errno !== undefined) error.errno = -errno;
  error.syscall = syscall;
  if (details.address !== undefined) error.address = details.address;
  if (details.port !== undefined) error.port = details.port;
  if (details.hostname !== undefined) error.hostname = details.hostname;
  return error;
}

export class KernelCallError extends Error {
  readonly code: string;
  constructor(shape: KernelErrorShape) {
    super(shape.message);
    this.code = shape.code;
  }
}

export class KernelClient {
  readonly #channel: FrameChannel;
  readonly #pipe: net.Socket;
  readonly #pending = new Map<number, (error: KernelCallError | null, reply: unknown) => void>();
  readonly #streams = new Map<number, StreamHandler>();
  readonly #datagrams = new Map<number, (header: Record<string, unknown>, data: Buffer) => void>();
  readonly #eventHandlers = new Map<string, (event: Record<string, unknown>) => void>();
  #nextRequest = 1;
  #refs = 0;

  constructor(fd: number) {
    // Created before any patch is installed: this is a real pipe handle.
    this.#pipe = new net.Socket({ fd, readable: true, writable: true });
    this.#channel = new FrameChannel(
      this.#pipe,
      (frame) => this.#onFrame(frame),
      () => this.#onChannelClosed(),
    );
    this.#pipe.unref();
  }

  /** Keeps the process alive while something waits on the kernel. */
  ref(): void {
    if (this.#refs++ === 0) this.#pipe.ref();
  }

  unref(): void {
    if (this.#refs > 0 && --this.#refs === 0) this.#pipe.unref();
  }

  onEvent(type: string, handler: (event: Record<string, unknown>) => void): void {
    this.#eventHandlers.set(type, handler);
  }

  emitEvent(value: Record<string, unknown>): void {
    this.#channel.send(encodeJson(FrameType.EVENT, 0, value));
  }

  /**
   * Calls the kernel; `onReply` runs synchronously when the reply frame is read.
   * Use this (not `call`) when frames that follow the reply depend on it — a new
   * stream's bytes, an accept on a new listener — since a promise would let the
   * next frames be handled before its continuation runs.
   */
  request<T = Record<string, unknown>>(op: string, args: Record<string, unknown>, onReply: (error: KernelCallError | null, reply: T) => void): void {
    const id = this.#nextRequest++;
    this.ref();
    this.#pending.set(id, (error, reply) => {
      this.unref();
      onReply(error, reply as T);
    });
    this.#channel.send(encodeJson(FrameType.CALL, id, { op, ...args }));
  }

  call<T = Record<string, unknown>>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    return new Promise<T>((resolve, reject) => this.request<T>(op, args, (error, reply) => (error ? reject(error) : resolve(reply))));
  }

  openStream(id: number, handler: StreamHandler): void {
    this.#streams.set(id, handler);
  }

  forgetStream(id: number): void {
    this.#streams.delete(id);
  }

  onDatagram(id: number, handler: ((header: Record<string, unknown>, data: Buffer) => void) | undefined): void {
    if (handler) this.#datagrams.set(id, handler);
    else this.#datagrams.delete(id);
  }

  sendData(id: number, chunk: Buffer): void {
    this.#channel.send(encodeHeader(FrameType.DATA, id, chunk.byteLength));
    this.#channel.send(chunk);
  }

  sendEnd(id: number): void {
    this.#channel.send(encodeHeader(FrameType.END, id, 0));
  }

  sendClose(id: number): void {
    this.#streams.delete(id);
    this.#channel.send(encodeHeader(FrameType.CLOSE, id, 0));
  }

  sendCredit(id: number, bytes: number): void {
    this.#channel.send(encodeCredit(id, bytes));
  }

  sendDatagram(id: number, header: Record<string, unknown>, data: Uint8Array): void {
    this.#channel.send(encodeDgram(id, header, data));
  }

  #onFrame(frame: Frame): void {
    switch (frame.type) {
      case FrameType.REPLY: {
        const waiter = this.#pending.get(frame.id);
        if (!waiter) return;
        this.#pending.delete(frame.id);
        const reply = parseJson(frame.payload) as { error?: KernelErrorShape };
        if (reply.error) waiter(new KernelCallError(reply.error), undefined);
        else waiter(null, reply);
        return;
      }
      case FrameType.EVENT: {
        const event = parseJson(frame.payload) as Record<string, unknown>;
        this.#eventHandlers.get(String(event.type))?.(event);
        return;
      }
      case FrameType.DATA:
        this.#streams.get(frame.id)?.data(frame.payload);
        return;
      case FrameType.END:
        this.#streams.get(frame.id)?.end();
        return;
      case FrameType.CREDIT:
        this.#streams.get(frame.id)?.credit(frame.payload.readUInt32LE(0));
        return;
      case FrameType.CLOSE: {
        const handler = this.#streams.get(frame.id);
        this.#streams.delete(frame.id);
        const { reset } = parseJson(frame.payload) as { reset?: boolean };
        handler?.close(reset !== false);
        return;
      }
      case FrameType.DGRAM: {
        const { header, data } = decodeDgram(frame.payload);
        this.#datagrams.get(frame.id)?.(header as Record<string, unknown>, data);
        return;
      }
    }
  }

  /** Without its kernel a guest has no network or children: end it rather than let it limp on. */
  #onChannelClosed(): void {
    for (const waiter of this.#pending.values()) waiter(new KernelCallError({ code: "EPIPE", message: "the VM kernel went away" }), undefined);
    this.#pending.clear();
    for (const handler of this.#streams.values()) handler.close(true);
    this.#streams.clear();
    process.exit(137);
  }
}
