/**
 * init's service for Node programs in the VM (see node-preload.cts): on one
 * loopback port it answers two kinds of connection.
 *
 * - A request, from 127.0.0.1: one JSON line, `{"op":"connect",host,port}` or
 *   `{"op":"resolve",name,family}` (family 0, 4 or 6), one JSON line back. A connect is decided
 *   and opened by the server at once (policy, name resolution, egress floor);
 *   the opened connection waits here under a fresh loopback address
 *   (127.a.b.c) that the answer names.
 * - The program's own socket, from that address: it is joined to the waiting
 *   connection. So the program's socket object is the one it made, with its
 *   TLS and options, and a denial is an error on it before any byte moves.
 *
 * A reservation not claimed in RESERVATION_MS is closed.
 */
import { createServer, type Server, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { splice } from "./egress/splice.ts";
import { errorCode, errorMessage, type OpenConnection, type ResolveName } from "./egress/types.ts";

const MAX_REQUEST = 4096;
const REQUEST_TIMEOUT_MS = 30_000;
const RESERVATION_MS = 10_000;
const MAX_RESERVATIONS = 1024;

/** The asking program's pid in the VM, as it says (for the audit only). */
const pidOf = (request: Record<string, unknown>): { pid?: number } =>
  Number.isInteger(request.pid) && (request.pid as number) > 0 ? { pid: request.pid as number } : {};

export function createGuestService(open: OpenConnection, resolve: ResolveName): Server {
  const reserved = new Map<string, { upstream: Duplex; timer: NodeJS.Timeout }>();

  const reserve = (upstream: Duplex): string => {
    let address: string;
    do address = `127.${1 + Math.floor(Math.random() * 254)}.${Math.floor(Math.random() * 256)}.${1 + Math.floor(Math.random() * 254)}`;
    while (reserved.has(address));
    const timer = setTimeout(() => {
      reserved.delete(address);
      upstream.destroy();
    }, RESERVATION_MS);
    reserved.set(address, { upstream, timer });
    return address;
  };

  const answer = async (request: Record<string, unknown>): Promise<object> => {
    if (request.op === "connect" && typeof request.host === "string" && Number.isInteger(request.port)) {
      if (reserved.size >= MAX_RESERVATIONS) throw Object.assign(new Error("too many connections waiting to be claimed"), { code: "EAGAIN" });
      const upstream = await open({ host: request.host, port: request.port as number, via: "node", ...pidOf(request) });
      upstream.on("error", () => {});
      return { ok: true, via: reserve(upstream) };
    }
    if (request.op === "udp" && typeof request.host === "string" && Number.isInteger(request.port)) {
      // Asked so the server decides and audits it; it relays no UDP, so the answer is a refusal.
      await open({ host: request.host, port: request.port as number, via: "udp", ...pidOf(request) });
      throw Object.assign(new Error(`udp ${request.host}:${request.port}: not relayed beyond the VM`), { code: "EACCES" });
    }
    if (request.op === "resolve" && typeof request.name === "string" && (request.family === 0 || request.family === 4 || request.family === 6)) {
      // Family 0 is both, asked one after the other so a refused name is refused (and audited) once.
      const first = request.family === 6 ? 6 : 4;
      const { pid } = pidOf(request);
      const addresses = (await resolve(request.name, first, pid)).map((address) => ({ address, family: first }));
      if (request.family === 0) addresses.push(...(await resolve(request.name, 6, pid).catch(() => [])).map((address) => ({ address, family: 6 })));
      return { ok: true, addresses };
    }
    throw Object.assign(new Error("malformed request"), { code: "EINVAL" });
  };

  const serveRequest = (socket: Socket): void => {
    let text = "";
    socket.setEncoding("utf8");
    socket.setTimeout(REQUEST_TIMEOUT_MS, () => socket.destroy());
    socket.on("data", (chunk: string) => {
      text += chunk;
      const end = text.indexOf("\n");
      if (end === -1) {
        if (text.length > MAX_REQUEST) socket.destroy();
        return;
      }
      socket.removeAllListeners("data");
      let request: Record<string, unknown>;
      try {
        request = JSON.parse(text.slice(0, end));
      } catch {
        socket.destroy();
        return;
      }
      answer(request).then(
        (reply) => socket.end(`${JSON.stringify(reply)}\n`),
        (error: unknown) => socket.end(`${JSON.stringify({ ok: false, code: errorCode(error), message: errorMessage(error) })}\n`),
      );
    });
  };

  const server = createServer({ noDelay: true, allowHalfOpen: true }, (socket) => {
    socket.on("error", () => {});
    const claim = reserved.get(socket.remoteAddress ?? "");
    if (!claim) return serveRequest(socket);
    reserved.delete(socket.remoteAddress!);
    clearTimeout(claim.timer);
    const { upstream } = claim;
    // Half-open both ways: an end from either side is passed on, not answered with one.
    (upstream as Socket).allowHalfOpen = true;
    splice(socket, upstream);
  });
  return server;
}
