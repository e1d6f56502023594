/**
 * `createClient<typeof registry>(endpoint)`: the typed client. It imports the
 * server only as types; at run time it is fetch plus the wire format, so it runs
 * in Node and in browsers.
 *
 * Handles are Proxies: any action name becomes a POST to the action route. The
 * proxy refuses `then`, so awaiting a handle does not try to call an action.
 */
import { isVmAction } from "../actions.ts";
import { AgentVmError, invalidArgument } from "../errors.ts";
import { AUTH_HEADER, CONTENT_ENCODING, decodeValue, encodeValue, ENVELOPE_TYPE, FETCH_TIMEOUT, FORWARD_HEADERS, fromBase64 } from "../wire.ts";
import { readServerEvents } from "./server-events.ts";
import { fileTransfers } from "./file-transfer.ts";
import type { AgentVmClient, ClientFetchInit, ClientOptions, DestroyResult, VmConnection, VmConnectionEvents, VmHandle, VmSummary } from "./types.ts";
import type { ExecOptions } from "../vm.ts";
import { ClusterLocator, nodeUnavailable, type Location } from "./cluster-locator.ts";
import { execStreamed, wantsStream } from "./exec-stream.ts";
import { processHandle } from "./process-handle.ts";
import { openTerminal, terminalQuery, type OpenTerminalOptions } from "./terminal.ts";

/** Response headers that describe our hop, not the guest's answer. */
const HOP_HEADERS = new Set(["connection", "keep-alive", "transfer-encoding", "date"]);

export function createClient<R>(options: string | ClientOptions): AgentVmClient<R> {
  const config: ClientOptions = typeof options === "string" ? { endpoint: options } : options;
  if (!config || typeof config.endpoint !== "string") throw invalidArgument("createClient needs an endpoint URL, e.g. createClient(\"http://localhost:6420\")");
  let endpoint: URL;
  try {
    endpoint = new URL(config.endpoint);
  } catch {
    throw invalidArgument(`createClient: endpoint ${JSON.stringify(config.endpoint)} is not a URL`);
  }
  const base = endpoint.href.replace(/\/$/, "");
  const transport = new Transport(base, config);
  return new Proxy({} as AgentVmClient<R>, {
    get(_target, definition) {
      if (typeof definition !== "string" || definition === "then") return undefined;
      return {
        getOrCreate: (key: string | readonly string[]) => createHandle(transport, definition, canonicalKey(key)),
        list: (options?: { after?: string; limit?: number }) => listVms(transport, definition, options),
      };
    },
  });
}

/** `"a"` and `["a"]` are the same VM; longer arrays become their JSON text. */
export function canonicalKey(key: unknown): string {
  const canonical = (() => {
    if (typeof key === "string") {
      if (key.length === 0) throw invalidArgument("VM key must not be empty");
      return key;
    }
    if (Array.isArray(key) && key.length > 0 && key.every((part) => typeof part === "string" && part.length > 0)) {
      return key.length === 1 ? (key[0] as string) : JSON.stringify(key);
    }
    throw invalidArgument(`VM key must be a non-empty string or an array of non-empty strings, got ${JSON.stringify(key)}`);
  })();
  // URLs resolve these as dot segments (even percent-encoded), so the request would go to another route.
  if (canonical === "." || canonical === "..") throw invalidArgument(`VM key must not be ${JSON.stringify(canonical)}: it cannot be sent in a URL path`);
  return canonical;
}

export class Transport {
  readonly base: string;
  readonly #headers: Record<string, string>;
  readonly #authorization: string | undefined;
  readonly #fetch: typeof fetch;
  #locator: Promise<ClusterLocator | undefined> | undefined;
  /** The API key or token, for routes that cannot send it as a header (WebSockets). */
  readonly token: string | undefined;
  readonly WebSocket: typeof WebSocket | undefined;

  constructor(base: string, options: ClientOptions) {
    this.base = base;
    if (options.token !== undefined && typeof options.token !== "string") throw invalidArgument(`createClient: token must be a string, got ${typeof options.token}`);
    const headers = { ...options.headers };
    const custom = Object.keys(headers).find((name) => name.toLowerCase() === "authorization");
    // An explicit token wins over headers; AGENTVM_TOKEN only fills in when headers have no Authorization.
    if (custom !== undefined && options.token !== undefined) delete headers[custom];
    const token = options.token ?? (custom === undefined ? environmentToken() : undefined);
    this.#authorization = token ? `Bearer ${token}` : undefined;
    this.token = token || undefined;
    this.WebSocket = options.WebSocket;
    this.#headers = headers;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /**
   * The endpoint is an agentvm server or, in a cluster, a Rivet Engine (its
   * /health says `"runtime": "engine"`); asked once per client.
   */
  locator(): Promise<ClusterLocator | undefined> {
    this.#locator ??= (async () => {
      let body: { runtime?: unknown } = {};
      try {
        const response = await this.#fetch(`${this.base}/health`, { headers: this.#headers });
        body = (await response.json().catch(() => ({}))) as { runtime?: unknown };
      } catch (error) {
        this.#locator = undefined;
        const cause = (error as { cause?: { code?: string; message?: string } }).cause;
        throw new AgentVmError("SERVER_UNREACHABLE", `cannot reach the agentvm server at ${this.base}: ${cause?.code ?? cause?.message ?? (error as Error).message}`, { cause: error });
      }
      if (body.runtime !== "engine") return undefined;
      // The engine's API reads Authorization; its gateway (the locate call) reads x-rivet-token.
      const authorization = this.#authorization ? { authorization: this.#authorization, "x-rivet-token": this.#authorization.slice("Bearer ".length) } : {};
      return new ClusterLocator(this.base, (url, init) => this.#fetch(url, { ...init, headers: { ...this.#headers, ...(init.headers as Record<string, string>), ...authorization } }));
    })();
    return this.#locator;
  }

  /**
   * `credentialHeader`: where the token goes; the vmFetch route uses AUTH_HEADER so the guest's own Authorization passes.
   * `authorization`: replaces the client's own credential (a cluster node's ticket; null sends none).
   */
  async request(url: string, init: RequestInit & { duplex?: "half" }, credentialHeader = "authorization", authorization?: string | null): Promise<Response> {
    let response: Response;
    const value = authorization === undefined ? this.#authorization : (authorization ?? undefined);
    const credential = value ? { [credentialHeader]: value } : {};
    try {
      response = await this.#fetch(url, { ...init, headers: { ...this.#headers, ...(init.headers as Record<string, string>), ...credential } });
    } catch (error) {
      if ((error as Error).name === "AbortError") throw error;
      const cause = (error as { cause?: { code?: string; message?: string } }).cause;
      throw new AgentVmError("SERVER_UNREACHABLE", `cannot reach the agentvm server at ${this.base}: ${cause?.code ?? cause?.message ?? (error as Error).message}`, { cause: error });
    }
    if (response.headers.get("x-agentvm-error")) throw await errorFrom(response);
    return response;
  }
}

/** AGENTVM_TOKEN in Node (and runtimes with its `process.env`); nothing in a browser. */
function environmentToken(): string | undefined {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env;
  const token = env?.AGENTVM_TOKEN;
  return typeof token === "string" && token.length > 0 ? token : undefined;
}

/** The `value` of a JSON answer from a route that is not an action. */
async function jsonValue<T>(response: Response, what: string): Promise<T> {
  try {
    return ((await response.json()) as { value: T }).value;
  } catch (error) {
    throw new AgentVmError("INTERNAL", `${what}: the server's answer (${response.status}) is not JSON: ${(error as Error).message}`, { cause: error });
  }
}

async function listVms(transport: Transport, definition: string, options: { after?: string; limit?: number } = {}): Promise<VmSummary[]> {
  if (options === null || typeof options !== "object") throw invalidArgument(`list: options must be an object, got ${String(options)}`);
  const query = new URLSearchParams();
  if (options.after !== undefined) query.set("after", String(options.after));
  if (options.limit !== undefined) query.set("limit", String(options.limit));
  const search = query.size > 0 ? `?${query}` : "";
  if (await transport.locator()) {
    throw new AgentVmError("UNKNOWN_ACTION", `list: ${transport.base} is a cluster engine; each node lists its own VMs (GET /api/${definition}/vms on a node, with its API key)`);
  }
  const response = await transport.request(`${transport.base}/api/${encodeURIComponent(definition)}/vms${search}`, { method: "GET" });
  return jsonValue<VmSummary[]>(response, "list");
}

async function errorFrom(response: Response): Promise<AgentVmError> {
  const text = await response.text();
  try {
    return AgentVmError.from((JSON.parse(text) as { error?: unknown }).error);
  } catch {
    return new AgentVmError("INTERNAL", `server answered ${response.status}: ${text.slice(0, 200)}`);
  }
}

/** A request to one of a VM's routes; `route` is relative to /api/{definition}/{key}. */
export type VmRequest = (route: string, init: RequestInit & { duplex?: "half" }) => Promise<Response>;

/** Where a VM's requests go: the server, or in a cluster the node that holds the VM (with its ticket). */
interface Target {
  prefix: string;
  authorization?: string | null;
  location?: Location;
}

function createHandle(transport: Transport, definition: string, key: string): VmHandle {
  const path = `/api/${encodeURIComponent(definition)}/${encodeURIComponent(key)}`;

  /** `unreadable`: what to assume when /health cannot be read at all (a page on another origin: the API sends no CORS). */
  async function target(unreadable?: "server"): Promise<Target> {
    const locator = await transport.locator().catch((error: unknown) => {
      if (unreadable) return undefined;
      throw error;
    });
    if (!locator) return { prefix: `${transport.base}${path}` };
    const location = await locator.locate(definition, key);
    return { prefix: `${location.url.replace(/\/$/, "")}${path}`, authorization: location.ticket ? `Bearer ${location.ticket}` : null, location };
  }

  /**
   * Sends a request to wherever the VM is. In a cluster, a node that no longer
   * holds the VM (VM_MOVED) or an expired ticket sends us back to the engine once
   * (when the body can be sent again); an unreachable node is VM_NODE_UNAVAILABLE.
   */
  async function send(build: (target: Target) => Promise<Response>, canRetry: boolean): Promise<Response> {
    const first = await target();
    try {
      return await build(first);
    } catch (error) {
      if (!first.location) throw error;
      const code = (error as AgentVmError).code;
      if (code === "SERVER_UNREACHABLE") {
        (await transport.locator())!.forget(definition, key);
        throw nodeUnavailable(first.location.node, key, `its API at ${first.location.url} does not answer`);
      }
      if ((code === "VM_MOVED" || code === "UNAUTHENTICATED") && canRetry) {
        (await transport.locator())!.forget(definition, key);
        return build(await target());
      }
      throw error;
    }
  }

  function post(action: string, args: unknown[], accept: string): Promise<Response> {
    const encoded = encodeValue(args);
    return send(
      (to) =>
        transport.request(`${to.prefix}/actions/${action}`, {
          method: "POST",
          headers: { "content-type": encoded.contentType, accept },
          body: encoded.body as RequestInit["body"],
        }, "authorization", to.authorization),
      true,
    );
  }

  async function call(action: string, args: unknown[]): Promise<unknown> {
    const response = await post(action, args, `${ENVELOPE_TYPE}, application/json`);
    const body = new Uint8Array(await response.arrayBuffer());
    try {
      return decodeValue(response.headers.get("content-type") ?? "application/json", body);
    } catch (error) {
      throw new AgentVmError("INTERNAL", `${action}: the server's answer (${response.status}) is not an agentvm result: ${(error as Error).message}`, { cause: error });
    }
  }

  async function fetchFromVm(port: number, path: string, init: ClientFetchInit = {}): Promise<Response> {
    if (typeof path !== "string") throw invalidArgument(`path must be a string, got ${typeof path}`);
    const target = /^[a-z][a-z0-9+.-]*:\/\//i.test(path) ? (() => { const url = new URL(path); return `${url.pathname}${url.search}`; })() : path.startsWith("/") ? path : `/${path}`;
    const headers = new Headers(init.headers as ConstructorParameters<typeof Headers>[0]);
    const names = [...headers.keys()];
    headers.set(FORWARD_HEADERS, JSON.stringify(names));
    if (init.timeoutMs !== undefined) headers.set(FETCH_TIMEOUT, String(init.timeoutMs));
    const body = init.body ?? null;
    return send(
      (to) =>
        transport.request(`${to.prefix}/fetch/${encodeURIComponent(String(port))}${target}`, {
          method: init.method ?? "GET",
          headers: Object.fromEntries(headers.entries()),
          body: body as RequestInit["body"],
          signal: init.signal ?? null,
          ...(body instanceof ReadableStream ? { duplex: "half" as const } : {}),
        }, AUTH_HEADER, to.authorization),
      !(body instanceof ReadableStream),
    );
  }

  function head(response: Response): { status: number; statusText: string; headers: Record<string, string> } {
    const headers: Record<string, string> = {};
    response.headers.forEach((value, name) => {
      if (HOP_HEADERS.has(name) || name === CONTENT_ENCODING) return;
      headers[name] = name === "set-cookie" ? response.headers.getSetCookie().join("\n") : value;
    });
    const encoding = response.headers.get(CONTENT_ENCODING);
    if (encoding) headers["content-encoding"] = encoding;
    return { status: response.status, statusText: response.statusText, headers };
  }

  const special = {
    key,
    async spawn(command: string, args?: string[], options?: { cwd?: string; env?: Record<string, string> }) {
      const spawnArgs: unknown[] = options === undefined ? (args === undefined ? [command] : [command, args]) : [command, args ?? [], options];
      const { pid } = (await call("spawn", spawnArgs)) as { pid: number };
      return processHandle(pid, call);
    },
    async exec(command: string, args?: string[], options?: ExecOptions) {
      if (!wantsStream(options)) return call("exec", options === undefined ? (args === undefined ? [command] : [command, args]) : [command, args ?? [], options]);
      return execStreamed((execArgs, accept) => post("exec", execArgs, accept), command, args, options);
    },
    async openTerminal(options: OpenTerminalOptions = {}) {
      const query = terminalQuery(options);
      // In a cluster the terminal is opened on the node that holds the VM, with that node's ticket.
      // A page on another origin cannot read /health (the API sends no CORS) but may open
      // WebSockets: then the endpoint is taken as the server, and a refusal is told by diagnose().
      // Locating errors (a node down, a refused credential) are reported as they are.
      const to = await target("server");
      const route = `${to.prefix}/terminal`;
      const token = to.authorization === undefined ? transport.token : (to.authorization?.slice("Bearer ".length) ?? undefined);
      return openTerminal({
        url: `${route.replace(/^http/, "ws")}${query}`,
        token,
        WebSocket: transport.WebSocket,
        // A plain GET of the route runs the same checks: its error says why the WebSocket was refused.
        diagnose: () =>
          transport.request(`${route}${query}`, { method: "GET" }, "authorization", to.authorization).then(
            () => new AgentVmError("SERVER_UNREACHABLE", `openTerminal: the WebSocket to ${route} could not be opened`),
            (error: unknown) =>
              AgentVmError.from(error).code === "UPGRADE_REQUIRED"
                ? new AgentVmError("SERVER_UNREACHABLE", `openTerminal: the WebSocket to ${route} could not be opened (a proxy in between may not pass WebSockets)`)
                : AgentVmError.from(error),
          ),
      });
    },
    // A streamed upload cannot be sent twice, so only bodies held in memory are retried after VM_MOVED.
    ...fileTransfers((route, init) =>
      send((to) => transport.request(`${to.prefix}${route}`, init, "authorization", to.authorization), !(init.body instanceof ReadableStream)),
    ),
    async vmFetch(port: number, path: string, init?: ClientFetchInit) {
      const response = await fetchFromVm(port, path, init);
      let body: Uint8Array;
      try {
        body = new Uint8Array(await response.arrayBuffer());
      } catch (error) {
        throw bodyFailed(error, port, path);
      }
      return { ...head(response), body };
    },
    async vmFetchStream(port: number, path: string, init?: ClientFetchInit) {
      const response = await fetchFromVm(port, path, init);
      if (!response.body) return { ...head(response), body: new ReadableStream<Uint8Array>({ start: (controller) => controller.close() }) };
      const reader = response.body.getReader();
      // The same stream, except that a cut-off body fails with an AgentVmError like every other failure.
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          try {
            const { value, done } = await reader.read();
            if (done) controller.close();
            else controller.enqueue(value);
          } catch (error) {
            controller.error(bodyFailed(error, port, path));
          }
        },
        cancel: (reason) => reader.cancel(reason),
      });
      return { ...head(response), body };
    },
    connect(options: { since?: number } = {}): VmConnection {
      const since = options?.since;
      if (since !== undefined && !(Number.isSafeInteger(since) && since >= 0)) {
        throw new AgentVmError("INVALID_ARGUMENT", `connect: since must be an output position (an integer ≥ 0), got ${String(since)}`);
      }
      const query = since === undefined ? "" : `?since=${since}`;
      return openConnection((signal) => send((to) => transport.request(`${to.prefix}/events${query}`, { method: "GET", headers: { accept: "text/event-stream" }, signal }, "authorization", to.authorization), true), `${path}/events`);
    },
    async destroy(options: { confirm: string | readonly string[] }): Promise<DestroyResult> {
      // An absent or wrong confirmation goes to the server, which refuses it with DESTROY_NOT_CONFIRMED and the way to confirm.
      const confirm = options?.confirm === undefined ? undefined : canonicalKey(options.confirm);
      const query = confirm === undefined ? "" : `?confirm=${encodeURIComponent(confirm)}`;
      const response = await send((to) => transport.request(`${to.prefix}${query}`, { method: "DELETE" }, "authorization", to.authorization), true);
      return jsonValue<DestroyResult>(response, "destroy");
    },
  };

  return new Proxy(special as unknown as VmHandle, {
    get(target, property) {
      if (typeof property !== "string" || property === "then") return undefined;
      if (Object.hasOwn(special, property)) return (target as unknown as Record<string, unknown>)[property];
      if (!isVmAction(property)) {
        return () => Promise.reject(new AgentVmError("UNKNOWN_ACTION", `unknown action ${JSON.stringify(property)}`));
      }
      return (...args: unknown[]) => call(property, args);
    },
  });
}

/** A response body that broke off after the guest's status and headers arrived. */
function bodyFailed(error: unknown, port: number, path: string): unknown {
  if ((error as Error)?.name === "AbortError") return error;
  return new AgentVmError("FETCH_FAILED", `vmFetch ${path} on port ${port}: the response body was cut off (${(error as Error)?.message ?? String(error)})`, { cause: error });
}

function openConnection(open: (signal: AbortSignal) => Promise<Response>, url: string): VmConnection {
  const controller = new AbortController();
  const listeners: { [E in keyof VmConnectionEvents]: Set<(payload: VmConnectionEvents[E]) => void> } = {
    processOutput: new Set(),
    processExit: new Set(),
  };
  const { promise: ready, resolve: resolveReady, reject: rejectReady } = Promise.withResolvers<void>();
  ready.catch(() => {});

  const dispatch = (event: string, data: string) => {
    // The server's last word on a stream it closes (EVENTS_TOO_SLOW): the connection fails with it.
    if (event === "error") throw AgentVmError.from(JSON.parse(data));
    if (event !== "processOutput" && event !== "processExit") return;
    const payload = JSON.parse(data) as Record<string, unknown>;
    if (event === "processOutput") {
      const bytes = (payload.data as { $base64?: string }).$base64;
      payload.data = fromBase64(bytes ?? "");
    }
    for (const listener of listeners[event]) (listener as (value: unknown) => void)(payload);
  };

  let disposed = false;
  const done = (async () => {
    const response = await open(controller.signal);
    await readServerEvents(response.body!, url, { connected: resolveReady, event: dispatch });
  })();
  // Settles when the connection ends: resolves after dispose(), rejects when the server or network ended it.
  const closed = done.then(
    () => undefined,
    (error: unknown) => {
      rejectReady(error);
      if (disposed) return;
      if (error instanceof AgentVmError) throw error;
      throw new AgentVmError("ECONNRESET", `the event connection ${url} failed: ${(error as Error)?.message ?? String(error)}`, { cause: error });
    },
  );
  closed.catch(() => {});

  return {
    ready,
    closed,
    on(event, listener) {
      listeners[event].add(listener);
      return () => listeners[event].delete(listener);
    },
    off(event, listener) {
      listeners[event].delete(listener);
    },
    async dispose() {
      disposed = true;
      controller.abort();
      await closed.catch(() => {});
    },
  };
}
