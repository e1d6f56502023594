/**
 * The VM's SOCKS5 proxy (RFC 1928), what `ALL_PROXY=socks5h://…` points at
 * inside a VM: no authentication, CONNECT only, IPv4 / domain name / IPv6
 * addresses. Each destination is decided by policy outside the VM (through
 * `open`) before anything is connected; after the reply the bytes are spliced
 * untouched.
 *
 * The handshake is parsed from a buffer that never holds more than the
 * largest valid handshake (a greeting of 257 bytes and a request of 262), and
 * a handshake that stalls is closed after `handshakeTimeoutMs`: a guest can
 * neither grow the proxy's memory nor hold its sockets open for free.
 */
import net from "node:net";
import type { Duplex } from "node:stream";
import { splice } from "./splice.ts";
import { errorCode, errorMessage, type EgressLog, type OpenConnection } from "./types.ts";

export interface Socks5Options {
  /** From accepting a connection to a complete request. Default 10 s. */
  handshakeTimeoutMs?: number;
}

const VERSION = 0x05;
const NO_AUTH = 0x00;
const NO_ACCEPTABLE_METHOD = 0xff;
const CMD_CONNECT = 0x01;
const ATYP_IPV4 = 0x01;
const ATYP_DOMAIN = 0x03;
const ATYP_IPV6 = 0x04;

/** RFC 1928 §6 reply codes. */
export const REPLY = {
  succeeded: 0x00,
  generalFailure: 0x01,
  notAllowedByRuleset: 0x02,
  networkUnreachable: 0x03,
  hostUnreachable: 0x04,
  connectionRefused: 0x05,
  commandNotSupported: 0x07,
  addressTypeNotSupported: 0x08,
} as const;

/** 2 + 255 methods, or 4 + 1 + 255 + 2 for a request naming the longest domain. */
const MAX_HANDSHAKE_BYTES = 262;

type Parsed<T> = { done: true; value: T; rest: Buffer } | { done: false } | { error: "malformed" | "unsupported-command" | "unsupported-address" };

export function createSocks5Proxy(open: OpenConnection, log?: EgressLog, options: Socks5Options = {}): net.Server {
  const timeoutMs = options.handshakeTimeoutMs ?? 10_000;
  return net.createServer({ allowHalfOpen: true }, (client) => handle(client, open, log, timeoutMs));
}

function handle(client: net.Socket, open: OpenConnection, log: EgressLog | undefined, timeoutMs: number): void {
  // Bytes belong to the handshake until "connecting"; from then on they are the destination's.
  let state: "greeting" | "request" | "connecting" = "greeting";
  let buffered: Buffer = Buffer.alloc(0);
  const timer = setTimeout(() => client.destroy(), timeoutMs);
  client.on("error", () => client.destroy());
  client.on("close", () => clearTimeout(timer));

  const onData = (chunk: Buffer) => {
    buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
    if (state === "greeting") {
      const greeting = parseGreeting(buffered);
      if ("error" in greeting) return void client.destroy();
      if (!greeting.done) return void overflowCheck();
      buffered = greeting.rest;
      if (!greeting.value.includes(NO_AUTH)) return refuse(Buffer.from([VERSION, NO_ACCEPTABLE_METHOD]));
      client.write(Buffer.from([VERSION, NO_AUTH]));
      state = "request";
    }
    if (state === "request") {
      const request = parseRequest(buffered);
      if ("error" in request) {
        if (request.error === "malformed") return void client.destroy();
        return refuse(replyBytes(request.error === "unsupported-command" ? REPLY.commandNotSupported : REPLY.addressTypeNotSupported));
      }
      if (!request.done) return void overflowCheck();
      // From here the client's bytes are the destination's: hold them in the socket until the tunnel exists.
      client.off("data", onData);
      client.pause();
      clearTimeout(timer);
      state = "connecting";
      void connect(request.value, request.rest);
    }
  };
  /**
   * The reply goes out with a FIN; whatever the client still sends is read and
   * dropped (a paused socket would hold a half-open connection forever), and
   * the socket is destroyed if the client has not closed within the timeout.
   */
  const refuse = (reply: Buffer): void => {
    client.off("data", onData);
    client.on("data", () => {});
    client.resume();
    client.end(reply);
    clearTimeout(timer);
    setTimeout(() => client.destroy(), timeoutMs).unref();
  };
  const overflowCheck = () => {
    if (buffered.length > MAX_HANDSHAKE_BYTES) client.destroy();
  };

  const connect = async (target: { host: string; port: number }, early: Buffer) => {
    let upstream: Duplex;
    try {
      upstream = await open({ ...target, via: "socks5" });
    } catch (error) {
      const code = errorCode(error);
      log?.({ ...target, via: "socks5", outcome: code === "EACCES" ? "denied" : "failed", code, message: errorMessage(error) });
      if (!client.destroyed) refuse(replyBytes(replyFor(code)));
      return;
    }
    log?.({ ...target, via: "socks5", outcome: "opened" });
    if (client.destroyed) return void upstream.destroy();
    client.write(replyBytes(REPLY.succeeded));
    if (early.length > 0) upstream.write(early);
    splice(client, upstream);
  };

  client.on("data", onData);
}

function parseGreeting(buffer: Buffer): Parsed<number[]> {
  if (buffer.length < 2) return { done: false };
  if (buffer[0] !== VERSION || buffer[1] === 0) return { error: "malformed" };
  const end = 2 + buffer[1]!;
  if (buffer.length < end) return { done: false };
  return { done: true, value: [...buffer.subarray(2, end)], rest: buffer.subarray(end) };
}

function parseRequest(buffer: Buffer): Parsed<{ host: string; port: number }> {
  if (buffer.length < 5) return { done: false };
  if (buffer[0] !== VERSION || buffer[2] !== 0x00) return { error: "malformed" };
  if (buffer[1] !== CMD_CONNECT) return buffer[1] === 0x02 || buffer[1] === 0x03 ? { error: "unsupported-command" } : { error: "malformed" };
  let host: string;
  let at: number;
  switch (buffer[3]) {
    case ATYP_IPV4:
      at = 4 + 4;
      if (buffer.length < at + 2) return { done: false };
      host = [...buffer.subarray(4, 8)].join(".");
      break;
    case ATYP_IPV6: {
      at = 4 + 16;
      if (buffer.length < at + 2) return { done: false };
      const groups: string[] = [];
      for (let i = 4; i < at; i += 2) groups.push(buffer.readUInt16BE(i).toString(16));
      // net.SocketAddress gives the canonical (compressed) spelling the policy compares against.
      host = new net.SocketAddress({ address: groups.join(":"), family: "ipv6" }).address;
      break;
    }
    case ATYP_DOMAIN: {
      const length = buffer[4]!;
      at = 5 + length;
      if (length === 0) return { error: "malformed" };
      if (buffer.length < at + 2) return { done: false };
      const name = buffer.subarray(5, at);
      // Printable ASCII only; the server validates the name further.
      if (name.some((byte) => byte <= 0x20 || byte >= 0x7f)) return { error: "malformed" };
      host = name.toString("latin1");
      break;
    }
    default:
      return { error: "unsupported-address" };
  }
  const port = buffer.readUInt16BE(at);
  if (port === 0) return { error: "malformed" };
  return { done: true, value: { host, port }, rest: buffer.subarray(at + 2) };
}

function replyFor(code: string): number {
  switch (code) {
    case "EACCES":
      return REPLY.notAllowedByRuleset;
    case "ECONNREFUSED":
      return REPLY.connectionRefused;
    case "ENETUNREACH":
      return REPLY.networkUnreachable;
    case "EHOSTUNREACH":
    case "ENOTFOUND":
    case "ETIMEDOUT":
      return REPLY.hostUnreachable;
    default:
      return REPLY.generalFailure;
  }
}

/** A reply with BND.ADDR 0.0.0.0:0: the real local address is the server's, meaningless in the VM. */
function replyBytes(code: number): Buffer {
  return Buffer.from([VERSION, code, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]);
}
