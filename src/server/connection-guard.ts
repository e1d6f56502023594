/**
 * Per-listener guards below the HTTP layer: how many connections one client
 * address may hold open, and typed answers for requests Node's parser refuses
 * (headers over maxHeaderBytes, unparseable requests) instead of its bare ones.
 * Both answer with the API's error shape, since no request handler ever runs.
 */
import type { IncomingMessage, Server } from "node:http";
import { isIP, type BlockList, type Socket } from "node:net";
import { AgentVmError, type ErrorCode } from "../errors.ts";
import { httpStatus } from "./http-api.ts";
import { trustedProxySet } from "./server-limits.ts";

const REASONS: Partial<Record<number, string>> = { 400: "Bad Request", 429: "Too Many Requests", 431: "Request Header Fields Too Large" };

/** A complete HTTP/1.1 error response, written straight to a socket, after which it closes. */
export function rawErrorResponse(code: ErrorCode, message: string): string {
  const body = JSON.stringify({ error: new AgentVmError(code, message).toJSON() });
  const status = httpStatus(code);
  return (
    `HTTP/1.1 ${status} ${REASONS[status] ?? "Error"}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n` +
    `x-agentvm-error: 1\r\nconnection: close\r\n\r\n${body}`
  );
}

export interface GuardOptions {
  maxConnectionsPerClient: number;
  maxHeaderBytes: number;
  what: string;
  /** Reverse proxies whose X-Forwarded-For is believed (server-limits.ts); none by default. */
  trustedProxies?: readonly string[];
}

/**
 * Counts open connections per client address. A connection from a trusted proxy
 * is not counted for the proxy: each of its requests names the client in
 * X-Forwarded-For, and the connection counts for that client (for the latest one,
 * should a proxy reuse it for another). From any other address the header is
 * never read, so a client cannot pick the address it is counted as.
 */
export function guardConnections(server: Server, options: GuardOptions): void {
  const open = new Map<string, number>();
  const proxies = options.trustedProxies?.length ? trustedProxySet(options.trustedProxies) : undefined;
  const take = (client: string): boolean => {
    const count = (open.get(client) ?? 0) + 1;
    open.set(client, count);
    return count <= options.maxConnectionsPerClient;
  };
  const release = (client: string) => {
    const left = (open.get(client) ?? 1) - 1;
    if (left <= 0) open.delete(client);
    else open.set(client, left);
  };
  const refusal = (client: string) =>
    rawErrorResponse("TOO_MANY_CONNECTIONS", `${client} already has ${options.maxConnectionsPerClient} open connections to the ${options.what} (limits.maxConnectionsPerClient); reuse connections (keep-alive) or close some`);
  /** Each proxied connection's current client. */
  const proxied = new WeakMap<Socket, { client: string | undefined }>();

  server.on("connection", (socket: Socket) => {
    const address = socket.remoteAddress ?? "unknown";
    if (proxies && isTrusted(proxies, address)) {
      const state: { client: string | undefined } = { client: undefined };
      proxied.set(socket, state);
      socket.once("close", () => state.client !== undefined && release(state.client));
      return;
    }
    if (!take(address)) {
      release(address);
      // Answered before any request is read: the client learns why, and holds nothing here.
      socket.end(refusal(address));
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    }
    socket.once("close", () => release(address));
  });

  if (proxies) {
    // Requests and upgrades on a proxied connection are counted before any handler sees them:
    // emit is where every listener (added before or after this guard) is reached from.
    const emit = server.emit.bind(server) as (event: string | symbol, ...args: unknown[]) => boolean;
    server.emit = ((event: string | symbol, ...args: unknown[]) => {
      if (event === "request" || event === "upgrade") {
        const request = args[0] as IncomingMessage;
        const state = proxied.get(request.socket);
        if (state) {
          const client = forwardedClient(proxies, request, request.socket.remoteAddress ?? "unknown");
          if (client !== state.client) {
            if (state.client !== undefined) release(state.client);
            state.client = client;
            if (!take(client)) {
              request.socket.end(refusal(client));
              setTimeout(() => request.socket.destroy(), 1000).unref();
              return true;
            }
          }
        }
      }
      return emit(event, ...args);
    }) as typeof server.emit;
  }

  server.on("clientError", (error: NodeJS.ErrnoException, socket: Socket) => {
    if (!socket.writable || error.code === "ECONNRESET") return void socket.destroy();
    // A request that took longer than Node's requestTimeout: answered as Node itself would.
    if (error.code === "ERR_HTTP_REQUEST_TIMEOUT") return void socket.end("HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    const response =
      error.code === "HPE_HEADER_OVERFLOW"
        ? rawErrorResponse("HEADERS_TOO_LARGE", `the request's headers are larger than ${options.maxHeaderBytes} bytes (limits.maxHeaderBytes); send less in headers (big data belongs in the body)`)
        : rawErrorResponse("MALFORMED_REQUEST", `the request is not valid HTTP/1.1 (${error.code ?? error.message})`);
    socket.end(response);
  });
}

/** An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; proxies are listed as a.b.c.d. */
function plainAddress(address: string): string {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return mapped ? mapped[1]! : address;
}

function isTrusted(proxies: BlockList, address: string): boolean {
  const plain = plainAddress(address);
  const family = isIP(plain);
  return family !== 0 && proxies.check(plain, family === 4 ? "ipv4" : "ipv6");
}

/**
 * The client a trusted proxy names: X-Forwarded-For read from the right, past any
 * trusted proxies in the chain, to the first address a trusted hop saw. Anything
 * not an IP address there (or no header) leaves the connection's own address:
 * only what a trusted proxy appended is believed.
 */
export function forwardedClient(proxies: BlockList, request: IncomingMessage, socketAddress: string): string {
  const header = request.headers["x-forwarded-for"];
  const hops = (Array.isArray(header) ? header.join(",") : (header ?? "")).split(",").map((hop) => hop.trim()).filter((hop) => hop !== "");
  for (let i = hops.length - 1; i >= 0; i--) {
    const hop = plainAddress(hops[i]!.replace(/^\[(.*)\]$/, "$1"));
    if (isIP(hop) === 0) break;
    if (!isTrusted(proxies, hop)) return hop;
  }
  return plainAddress(socketAddress);
}
