/**
 * The VM's HTTP forward proxy (DESIGN §1 "Egress goes through policy"): what
 * `HTTP_PROXY`/`HTTPS_PROXY` point at inside a VM.
 *
 * - `CONNECT host:port` opens a tunnel: after `200 Connection Established` the
 *   bytes are spliced both ways untouched, so TLS stays end to end between the
 *   guest and the destination.
 * - Absolute-form requests (`GET http://host:port/path`) are forwarded over a
 *   connection opened for that request alone, so every request is decided by
 *   policy; the guest's connection to the proxy stays keep-alive.
 *
 * Node's http module parses both directions; this file never parses HTTP. A
 * denial answers 403 with `x-agentvm-denied: <code>` and a body naming the
 * destination and the rule; a failure to connect answers 502 with the reason.
 */
import type * as Http from "node:http";
import { createRequire } from "node:module";
import { isIP, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { splice } from "./splice.ts";
import { errorCode, errorMessage, type EgressLog, type EgressVia, type OpenConnection } from "./types.ts";

/**
 * Required, not imported: an ES import of node:http builds its namespace, which
 * runs http's lazy getters (WebSocket and friends load undici) — 7 MB more in
 * every VM's init, measured.
 */
const http = createRequire(import.meta.url)("node:http") as typeof Http;

// RFC 9110 §7.6.1 hop-by-hop fields, plus the proxy's own; headers named in `Connection` go too.
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"]);

export function createHttpProxy(open: OpenConnection, log?: EgressLog): Http.Server {
  const server = http.createServer({
    // Uploads and downloads may stream for as long as they like; only headers are timed.
    requestTimeout: 0,
    headersTimeout: 30_000,
  });
  server.on("request", (request, response) => void forward(open, log, request, response));
  server.on("connect", (request: Http.IncomingMessage, socket: Duplex, head: Buffer) => void tunnel(open, log, request, socket, head));
  server.on("clientError", (_error, socket: Duplex) => {
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    else socket.destroy();
  });
  return server;
}

async function tunnel(open: OpenConnection, log: EgressLog | undefined, request: Http.IncomingMessage, client: Duplex, head: Buffer): Promise<void> {
  client.on("error", () => client.destroy());
  const target = parseAuthority(request.url ?? "", undefined);
  if (!target) {
    client.end(rawResponse(400, "Bad Request", {}, `agentvm: CONNECT needs host:port, got ${JSON.stringify((request.url ?? "").slice(0, 100))}\n`));
    return;
  }
  let upstream: Duplex;
  try {
    upstream = await openLogged(open, log, { ...target, via: "connect" });
  } catch (error) {
    const failure = describeFailure(error, target, "connect");
    client.end(rawResponse(failure.status, failure.statusText, failure.headers, failure.body));
    return;
  }
  if (client.destroyed) {
    upstream.destroy();
    return;
  }
  client.write("HTTP/1.1 200 Connection Established\r\n\r\n");
  if (head.length > 0) upstream.write(head);
  splice(client, upstream);
}

async function forward(open: OpenConnection, log: EgressLog | undefined, request: Http.IncomingMessage, response: Http.ServerResponse): Promise<void> {
  const url = /^http:\/\/([^/?#]*)([^#]*)/i.exec(request.url ?? "");
  const target = url ? parseAuthority(url[1]!.slice(url[1]!.lastIndexOf("@") + 1), 80) : undefined;
  if (!url || !target) {
    const hint = /^https:/i.test(request.url ?? "") ? "https:// URLs go through CONNECT" : "a proxy request needs an absolute http:// URL";
    reply(response, 400, {}, `agentvm: ${hint}, got ${JSON.stringify((request.url ?? "").slice(0, 100))}\n`);
    return;
  }
  let socket: Duplex;
  try {
    socket = await openLogged(open, log, { ...target, via: "http" });
  } catch (error) {
    const failure = describeFailure(error, target, "http");
    reply(response, failure.status, failure.headers, failure.body);
    return;
  }
  if (request.destroyed) {
    socket.destroy();
    return;
  }
  const path = url[2]!.startsWith("/") ? url[2]! : `/${url[2]!}`;
  const outgoing = http.request({
    method: request.method,
    path,
    headers: withHost(endToEnd(request.rawHeaders), target),
    // The opened connection serves this request alone; with no agent, Node closes it after the response.
    createConnection: () => socket as Socket,
    setHost: false,
  });
  // Opened connections come paused (so none of their bytes is read before a
  // handover); HTTP speaks first from this side, so nothing arrives before the
  // client's listeners do.
  socket.resume();
  const abort = () => {
    outgoing.destroy();
    socket.destroy();
  };
  outgoing.on("error", (error) => {
    if (response.headersSent) response.destroy();
    else reply(response, 502, { "x-agentvm-error": errorCode(error) }, `agentvm: ${request.method} http://${authority(target)}${path} failed: ${errorMessage(error)}\n`);
    socket.destroy();
  });
  outgoing.on("response", (incoming) => {
    response.writeHead(incoming.statusCode ?? 502, incoming.statusMessage, endToEnd(incoming.rawHeaders));
    incoming.pipe(response);
    incoming.on("error", () => response.destroy());
  });
  // A guest that goes away mid-exchange must not leave the destination's connection open.
  response.on("close", () => {
    if (!response.writableFinished) abort();
  });
  request.pipe(outgoing);
}

/** Headers minus hop-by-hop and Proxy-* ones, in the flat [name, value, …] form http accepts. */
function endToEnd(raw: string[]): string[] {
  const named = new Set<string>();
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.toLowerCase() === "connection") for (const token of raw[i + 1]!.split(",")) named.add(token.trim().toLowerCase());
  }
  const kept: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toLowerCase();
    if (HOP_BY_HOP.has(name) || named.has(name) || name.startsWith("proxy-")) continue;
    kept.push(raw[i]!, raw[i + 1]!);
  }
  return kept;
}

/** HTTP/1.0 guests may omit Host; the destination gets the one the URL names. */
function withHost(headers: string[], target: { host: string; port: number }): string[] {
  for (let i = 0; i < headers.length; i += 2) if (headers[i]!.toLowerCase() === "host") return headers;
  return [...headers, "Host", target.port === 80 ? hostOnly(target.host) : authority(target)];
}

function hostOnly(host: string): string {
  return isIP(host) === 6 ? `[${host}]` : host;
}

async function openLogged(open: OpenConnection, log: EgressLog | undefined, target: { host: string; port: number; via: EgressVia }): Promise<Duplex> {
  try {
    const socket = await open(target);
    log?.({ ...target, outcome: "opened" });
    return socket;
  } catch (error) {
    const code = errorCode(error);
    log?.({ ...target, outcome: code === "EACCES" ? "denied" : "failed", code, message: errorMessage(error) });
    throw error;
  }
}

interface Failure {
  status: number;
  statusText: string;
  headers: Record<string, string>;
  body: string;
}

function describeFailure(error: unknown, target: { host: string; port: number }, via: EgressVia): Failure {
  const code = errorCode(error);
  const where = authority(target);
  if (code === "EACCES") {
    return {
      status: 403,
      statusText: "Forbidden",
      headers: { "x-agentvm-denied": code },
      body: `agentvm: ${via} to ${where} denied: ${errorMessage(error)}; to allow it, add an allow rule to permissions.network\n`,
    };
  }
  if (code === "INVALID_ARGUMENT") return { status: 400, statusText: "Bad Request", headers: { "x-agentvm-error": code }, body: `agentvm: ${errorMessage(error)}\n` };
  return { status: 502, statusText: "Bad Gateway", headers: { "x-agentvm-error": code }, body: `agentvm: ${via} to ${where} failed (${code}): ${errorMessage(error)}\n` };
}

function reply(response: Http.ServerResponse, status: number, headers: Record<string, string>, body: string): void {
  if (response.headersSent) {
    response.destroy();
    return;
  }
  response.writeHead(status, { ...headers, "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(body) });
  response.end(body);
}

/** A response on a socket the http server has handed over (CONNECT): written whole, then the socket ends. */
function rawResponse(status: number, statusText: string, headers: Record<string, string>, body: string): string {
  const lines = Object.entries({ ...headers, "content-type": "text/plain; charset=utf-8", "content-length": String(Buffer.byteLength(body)), connection: "close" });
  return `HTTP/1.1 ${status} ${statusText}\r\n${lines.map(([name, value]) => `${name}: ${value}\r\n`).join("")}\r\n${body}`;
}

/** `host:port`, `[v6]:port`, or (with a default port) a bare host; undefined when malformed. */
export function parseAuthority(text: string, defaultPort: number | undefined): { host: string; port: number } | undefined {
  const match = /^(?:\[([0-9a-f:.]+)\]|([^:[\]]+))(?::(\d{1,5}))?$/i.exec(text);
  if (!match) return undefined;
  const host = match[1] ?? match[2]!;
  if (match[1] !== undefined && isIP(host) !== 6) return undefined;
  const port = match[3] === undefined ? defaultPort : Number(match[3]);
  if (port === undefined || port < 1 || port > 65535) return undefined;
  return { host, port };
}

function authority(target: { host: string; port: number }): string {
  return isIP(target.host) === 6 ? `[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}
