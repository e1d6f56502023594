/**
 * Per-listener guards below the HTTP layer: how many connections one client
 * address may hold open, and typed answers for requests Node's parser refuses
 * (headers over maxHeaderBytes, unparseable requests) instead of its bare ones.
 * Both answer with the API's error shape, since no request handler ever runs.
 */
import type { Server } from "node:http";
import type { Socket } from "node:net";
import { AgentVmError, type ErrorCode } from "../errors.ts";
import { httpStatus } from "./http-api.ts";

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

export function guardConnections(server: Server, options: { maxConnectionsPerClient: number; maxHeaderBytes: number; what: string }): void {
  const open = new Map<string, number>();
  server.on("connection", (socket: Socket) => {
    const address = socket.remoteAddress ?? "unknown";
    const count = (open.get(address) ?? 0) + 1;
    if (count > options.maxConnectionsPerClient) {
      // Answered before any request is read: the client learns why, and holds nothing here.
      socket.end(rawErrorResponse("TOO_MANY_CONNECTIONS", `${address} already has ${options.maxConnectionsPerClient} open connections to the ${options.what} (limits.maxConnectionsPerClient); reuse connections (keep-alive) or close some`));
      setTimeout(() => socket.destroy(), 1000).unref();
      return;
    }
    open.set(address, count);
    socket.once("close", () => {
      const left = (open.get(address) ?? 1) - 1;
      if (left <= 0) open.delete(address);
      else open.set(address, left);
    });
  });
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
