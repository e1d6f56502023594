/**
 * vmFetch: HTTP/1.1 from the host into a VM port. init connects to the port on
 * the VM's loopback and hands the connected socket over; Node's http client
 * then speaks HTTP on it directly (keep-alive, chunked bodies), through one
 * keep-alive Agent per VM so sockets are reused.
 */
import { Agent, request as httpRequest, type ClientRequest, type IncomingMessage, type OutgoingHttpHeaders } from "node:http";
import type { Socket } from "node:net";
import { Readable } from "node:stream";
import { AgentVmError } from "../errors.ts";
import type { ListenWait } from "../init/protocol.ts";
import { describe, expectObject, expectPort, expectString, expectKnownKeys } from "../validate.ts";

export type VmFetchBody = string | Uint8Array | ArrayBuffer | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array> | null;

export interface VmFetchInit {
  method?: string;
  headers?: Record<string, string> | [string, string][] | Headers;
  body?: VmFetchBody;
  /** Milliseconds without any response activity before the request fails with ETIMEDOUT; none by default. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface VmFetchResponse {
  status: number;
  statusText: string;
  headers: Record<string, string>;
  body: Uint8Array;
}

export interface VmFetchStreamResponse {
  status: number;
  statusText: string;
  headers: Record<string, string>;
  body: ReadableStream<Uint8Array>;
}

/**
 * Opens a connection to a port on the VM's loopback; while nothing listens, init waits for the
 * programs in `wait` to open it; rejects with ECONNREFUSED when nothing listens (any more).
 */
export type PortConnector = (port: number, wait: ListenWait[]) => Promise<Socket>;

const METHOD = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

export class VmFetcher {
  readonly #connectToPort: PortConnector;
  readonly #vmName: string;
  readonly #agent: Agent;

  /**
   * The programs a request to a closed port may wait for: those that were just
   * started get a moment to reach listen(), so `spawn` followed at once by
   * `vmFetch` (as the docs' examples do) does not race. init waits (one request).
   */
  readonly #listenWaits: () => ListenWait[];

  constructor(connectToPort: PortConnector, vmName: string, listenWaits: () => ListenWait[] = () => []) {
    this.#connectToPort = connectToPort;
    this.#vmName = vmName;
    this.#listenWaits = listenWaits;
    this.#agent = new Agent({ keepAlive: true, keepAliveMsecs: 1000, maxFreeSockets: 64 });
    // http.Agent calls this for each new connection. Every request into the VM (vmFetch,
    // the client's fetch route, the preview gateway) connects here, so the start-up
    // grace applies to all of them alike.
    (this.#agent as unknown as { createConnection: unknown }).createConnection = (
      options: { port: number },
      callback: (error: Error | null, socket?: Socket) => void,
    ) => {
      this.connect(Number(options.port)).then(
        (socket) => callback(null, socket),
        (error: unknown) => callback(error as Error),
      );
      return undefined;
    };
  }

  /** A connection to a port in the VM (WebSocket relays), waiting out the start-up grace; ECONNREFUSED when nothing listens. */
  async connect(port: number): Promise<Socket> {
    try {
      return await this.#connectToPort(port, this.#listenWaits());
    } catch (error) {
      throw (error as { code?: string }).code === "ECONNREFUSED" ? this.#refused(port, error) : error;
    }
  }

  async fetch(port: unknown, path: unknown, init?: unknown): Promise<VmFetchResponse> {
    const response = await this.#exchange(port, path, init);
    const chunks: Buffer[] = [];
    try {
      for await (const chunk of response) chunks.push(chunk as Buffer);
    } catch (error) {
      throw this.#failed(String(path), error, Number(port));
    }
    return { ...this.#head(response), body: Buffer.concat(chunks) };
  }

  async fetchStream(port: unknown, path: unknown, init?: unknown): Promise<VmFetchStreamResponse> {
    const response = await this.#exchange(port, path, init);
    return { ...this.#head(response), body: Readable.toWeb(response) as ReadableStream<Uint8Array> };
  }

  /** Like fetchStream with the body as a Node Readable (no web-stream conversion, for host-side proxies). */
  async fetchReadable(port: unknown, path: unknown, init?: unknown): Promise<Omit<VmFetchResponse, "body"> & { body: Readable }> {
    const response = await this.#exchange(port, path, init);
    return { ...this.#head(response), body: response };
  }

  /**
   * A raw request into the VM for proxies that stream both ways (the preview
   * gateway): the caller writes the body and reads the response itself.
   * Errors (ECONNREFUSED included) arrive as the request's 'error' event.
   */
  request(port: number, options: { method: string; path: string; headers: OutgoingHttpHeaders }): ClientRequest {
    return httpRequest({ agent: this.#agent, host: "localhost", port, path: options.path, method: options.method, headers: options.headers });
  }

  close(): void {
    this.#agent.destroy();
  }

  #head(response: IncomingMessage): Omit<VmFetchResponse, "body"> {
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(response.headers)) {
      if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(name === "set-cookie" ? "\n" : ", ") : value;
    }
    return { status: response.statusCode ?? 0, statusText: response.statusMessage ?? "", headers };
  }

  async #exchange(portArg: unknown, pathArg: unknown, initArg: unknown): Promise<IncomingMessage> {
    const port = expectPort("port", portArg);
    const path = normalizePath(expectString("path", pathArg, { max: 64 * 1024 }));
    const init = initArg === undefined ? {} : (expectObject("init", initArg) as VmFetchInit);
    expectKnownKeys("init", init as Record<string, unknown>, ["method", "headers", "body", "timeoutMs", "signal"]);
    const method = (init.method ?? "GET").toUpperCase();
    if (!METHOD.test(method)) throw new AgentVmError("INVALID_ARGUMENT", `init.method ${JSON.stringify(init.method)} is not an HTTP method`);
    const headers = normalizeHeaders(init.headers);
    const body = init.body ?? null;
    if (body !== null && !isBody(body)) {
      throw new AgentVmError("INVALID_ARGUMENT", `init.body must be a string, Uint8Array, ArrayBuffer, ReadableStream or async iterable, got ${describe(body)}`);
    }
    if (init.timeoutMs !== undefined && !(typeof init.timeoutMs === "number" && Number.isFinite(init.timeoutMs) && init.timeoutMs > 0)) {
      throw new AgentVmError("INVALID_ARGUMENT", `init.timeoutMs must be a positive number of milliseconds, got ${describe(init.timeoutMs)}`);
    }
    if (init.signal !== undefined && !(init.signal instanceof AbortSignal)) {
      throw new AgentVmError("INVALID_ARGUMENT", `init.signal must be an AbortSignal, got ${describe(init.signal)}`);
    }
    const hasLength = Object.keys(headers).some((name) => name.toLowerCase() === "content-length");
    if (!hasLength && (typeof body === "string" || body instanceof Uint8Array || body instanceof ArrayBuffer)) {
      headers["content-length"] = String(typeof body === "string" ? Buffer.byteLength(body) : body.byteLength);
    }
    if (!Object.keys(headers).some((name) => name.toLowerCase() === "host")) headers.host = `localhost:${port}`;

    return new Promise<IncomingMessage>((resolve, reject) => {
      const request = httpRequest({ agent: this.#agent, host: "localhost", port, path, method, headers, signal: init.signal });
      let response: IncomingMessage | undefined;
      if (init.timeoutMs) {
        request.setTimeout(init.timeoutMs, () => {
          const error = new AgentVmError("ETIMEDOUT", `vmFetch ${method} ${path} on port ${port} in VM ${this.#vmName}: no response within ${init.timeoutMs} ms`);
          response?.destroy(error); // a body that stalls fails with ETIMEDOUT too, not a bare "aborted"
          request.destroy(error);
        });
      }
      request.once("response", (answer) => resolve((response = answer)));
      request.once("error", (error) => reject(this.#failed(path, error, port)));
      if (body === null) request.end();
      else if (typeof body === "string" || body instanceof Uint8Array) request.end(body);
      else if (body instanceof ArrayBuffer) request.end(new Uint8Array(body));
      else {
        const source =
          body instanceof Readable ? body : body instanceof ReadableStream ? Readable.fromWeb(body as import("node:stream/web").ReadableStream) : Readable.from(body);
        source.once("error", (error) => request.destroy(error));
        source.pipe(request);
      }
    });
  }

  #refused(port: number, cause?: unknown): AgentVmError {
    return new AgentVmError(
      "ECONNREFUSED",
      `vmFetch: nothing is listening on port ${port} in VM ${this.#vmName}; start a server on that port inside the VM first`,
      { cause },
    );
  }

  #failed(path: string, error: unknown, port?: number): AgentVmError {
    if (error instanceof AgentVmError) return error;
    const code = (error as { code?: string }).code;
    if (code === "ABORT_ERR") return new AgentVmError("FETCH_FAILED", `vmFetch ${path}: aborted`, { cause: error });
    const where = port === undefined ? "" : ` on port ${port} in VM ${this.#vmName}`;
    return new AgentVmError(
      code === "ECONNRESET" ? "ECONNRESET" : "FETCH_FAILED",
      `vmFetch ${path}${where} failed: ${(error as Error).message ?? String(error)}`,
      { cause: error },
    );
  }
}

/** Accepts "/x", "x" and full URLs ("http://localhost:3000/x"), keeping only path and query. */
function normalizePath(path: string): string {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(path)) {
    const url = new URL(path);
    return `${url.pathname}${url.search}`;
  }
  if (/[\s]/.test(path)) throw new AgentVmError("INVALID_ARGUMENT", `path must not contain whitespace; encode it (got ${JSON.stringify(path)})`);
  if (!path.isWellFormed()) throw new AgentVmError("INVALID_ARGUMENT", `path contains a lone surrogate (got ${JSON.stringify(path)})`);
  // Non-ASCII goes out percent-encoded as UTF-8, as fetch() and browsers send it.
  const encoded = path.replace(/[^\x21-\x7e]+/g, (run) => encodeURIComponent(run));
  return encoded.startsWith("/") ? encoded : `/${encoded}`;
}

function normalizeHeaders(headers: VmFetchInit["headers"]): OutgoingHttpHeaders & Record<string, string> {
  const out: Record<string, string> = {};
  if (headers === undefined) return out;
  const entries: Iterable<[unknown, unknown]> =
    headers instanceof Headers ? headers.entries() : Array.isArray(headers) ? headers : Object.entries(expectObject("init.headers", headers));
  for (const [name, value] of entries) {
    if (typeof name !== "string" || !METHOD.test(name)) throw new AgentVmError("INVALID_ARGUMENT", `init.headers: ${JSON.stringify(name)} is not a valid header name`);
    if (typeof value !== "string" && typeof value !== "number") {
      throw new AgentVmError("INVALID_ARGUMENT", `init.headers.${name} must be a string, got ${describe(value)}`);
    }
    const text = String(value);
    if (/[\r\n\0]/.test(text)) throw new AgentVmError("INVALID_ARGUMENT", `init.headers.${name} must not contain CR, LF or NUL`);
    if (/[^\t\x20-\x7e\x80-\xff]/.test(text)) throw new AgentVmError("INVALID_ARGUMENT", `init.headers.${name} must hold Latin-1 text only; encode other characters`);
    out[name] = text;
  }
  return out;
}

function isBody(value: unknown): boolean {
  return (
    typeof value === "string" ||
    value instanceof Uint8Array ||
    value instanceof ArrayBuffer ||
    value instanceof ReadableStream ||
    (typeof value === "object" && value !== null && Symbol.asyncIterator in value)
  );
}
