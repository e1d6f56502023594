/**
 * The HTTP API the client speaks (docs/http-api.md):
 *
 *   POST /api/:definition/:key/actions/:action   call a VM action (args array in, result out)
 *   ANY  /api/:definition/:key/fetch/:port/*     vmFetch, streamed both ways
 *   GET  /api/:definition/:key/events            processOutput / processExit as Server-Sent Events
 *   GET  /api/:definition/:key/status            awake or asleep, without waking it
 *   GET  /api/:definition/:key/terminal          a terminal over a WebSocket (terminal-route.ts)
 *   GET|PUT /api/:definition/:key/files/*, tar/*, GET watch/*   streamed files (file-transfer-route.ts)
 *   GET  /api/:definition/vms                    list a definition's VMs (API key holders)
 *   DELETE /api/:definition/:key?confirm=:key    destroy a VM: processes, files, rows, previews
 *   GET  /api/definitions                        the registry's VM definition names (API key holders)
 *   POST /api/tokens                             mint a scoped token (API key holders)
 *   DELETE /api/tokens/:id                       revoke a scoped token (API key holders)
 *   GET  /  and /dashboard/*                     the dashboard page (static; it calls the API above)
 *   GET  /health                                 no credentials needed
 *   GET  /openapi.json                           this API as OpenAPI 3.1 (openapi.ts), no credentials needed
 *
 * Every failure is `{ "error": { "code", "message" } }` with a status derived
 * from the code and the `x-agentvm-error: 1` header, so a client can tell our
 * errors from a guest's own responses on the fetch route.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { pipeline } from "node:stream";
import { isVmAction } from "../actions.ts";
import { AgentVmError, type ErrorCode } from "../errors.ts";
import { AUTH_HEADER, CONTENT_ENCODING, decodeValue, encodeValue, ENVELOPE_TYPE, FETCH_TIMEOUT, FORWARD_HEADERS, toBase64, WireFormatError } from "../wire.ts";
import type { Authenticator, TokenRequest } from "./auth.ts";
import { isDashboardPath, serveDashboard } from "./dashboard-route.ts";
import { refuseFormPost, requireBodyType, type OriginPolicy } from "./request-origin.ts";
import { EventStream } from "./event-stream.ts";
import { isTransferRoute, serveTransfer, transferAction, TRANSFER_ROUTES, type TransferRoute } from "./file-transfer-route.ts";
import type { DestroyResult, VmActor, VmStatus, VmSummary } from "./vm-actor.ts";
import type { ProcessOutputEvent } from "../vm.ts";
import { streamExec, wantsExecStream } from "./exec-stream.ts";

export const MAX_KEY_LENGTH = 256;

const STATUS: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 400,
  MALFORMED_REQUEST: 400,
  EINVAL: 400,
  // A symlink loop in the VM's own files: the path names nothing a caller can use.
  ELOOP: 400,
  PREVIEW_TTL_INVALID: 400,
  PREVIEW_TTL_TOO_LONG: 400,
  PREVIEW_TOKEN_LIMIT: 429,
  DESTROY_NOT_CONFIRMED: 400,
  VM_DESTROY_FAILED: 500,
  UNAUTHENTICATED: 401,
  FORBIDDEN: 403,
  HOST_NOT_ALLOWED: 403,
  ORIGIN_NOT_ALLOWED: 403,
  UNSUPPORTED_MEDIA_TYPE: 415,
  UPGRADE_REQUIRED: 426,
  PATH_OUTSIDE_VM: 403,
  EACCES: 403,
  EPERM: 403,
  EROFS: 403,
  ENOENT: 404,
  ENOTFOUND: 404,
  ESRCH: 404,
  UNKNOWN_ACTION: 404,
  EEXIST: 409,
  ENOTEMPTY: 409,
  EISDIR: 409,
  ENOTDIR: 409,
  VM_DISPOSED: 410,
  PAYLOAD_TOO_LARGE: 413,
  HEADERS_TOO_LARGE: 431,
  TOO_MANY_CONNECTIONS: 429,
  TOO_MANY_VMS: 507,
  EAGAIN: 429,
  LIMIT_EXCEEDED: 429,
  VM_DISK_FULL: 507,
  ENOSPC: 507,
  ENOTSUP: 501,
  EMFILE: 429,
  ECONNREFUSED: 502,
  ECONNRESET: 502,
  FETCH_FAILED: 502,
  SANDBOX_UNAVAILABLE: 503,
  SANDBOX_EXITED: 503,
  EXEC_TIMEOUT: 504,
  EXEC_OUTPUT_LIMIT: 413,
  IMAGE_BUILD_FAILED: 503,
  GUEST_RUNTIME_MISSING: 503,
  SERVER_CLOSING: 503,
  VM_NODE_UNAVAILABLE: 503,
  PREVIEW_NODE_UNAVAILABLE: 503,
  VM_MOVED: 409,
  ETIMEDOUT: 504,
  RANGE_NOT_SATISFIABLE: 416,
};

/** Headers that describe one hop, never forwarded by a proxy (RFC 9110 §7.6.1). */
export const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

export interface ApiContext {
  /** Finds (or creates) the actor for a definition and key; undefined when the definition is unknown. */
  actor(definition: string, key: string): VmActor | undefined;
  hasDefinition(definition: string): boolean;
  /** The registry's definition names. */
  definitions(): string[];
  /** A definition's VMs in key order, after `after`, at most `limit`. */
  listVms(definition: string, options: { after?: string; limit?: number }): VmSummary[];
  destroyVm(definition: string, key: string): Promise<DestroyResult>;
  /** Ends one scoped token (DELETE /api/tokens/{id}); false when it was revoked already. */
  revokeToken(tokenOrId: unknown): Promise<boolean>;
  /** The OpenAPI document of this server (GET /openapi.json). */
  openApi(): unknown;
  /** A VM's status, read without creating an actor for it or waking it. */
  vmStatus(definition: string, key: string): VmStatus;
  auth: Authenticator;
  origins: OriginPolicy;
  maxBodyBytes: number;
  /** Cluster nodes: throws VM_MOVED for a VM this node does not hold. */
  placement?(definition: string, key: string): void;
}

const TOKEN_BODY_LIMIT = 64 * 1024;
/** No action takes more arguments than this; more would only be spread onto the stack. */
export const MAX_ACTION_ARGS = 8;

/** The HTTP status an error code is answered with (docs/errors.md lists them). */
export function httpStatus(code: ErrorCode): number {
  return STATUS[code] ?? 500;
}

export function sendError(response: ServerResponse, error: unknown, extraHeaders: Record<string, string> = {}): void {
  const shaped = AgentVmError.from(error);
  if (response.headersSent) {
    response.destroy(shaped);
    return;
  }
  const body = JSON.stringify({ error: shaped.toJSON() });
  // A refused body is not read to its end: the connection closes after the answer.
  const refusedBody = shaped.code === "PAYLOAD_TOO_LARGE";
  response.writeHead(httpStatus(shaped.code), {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
    "x-agentvm-error": "1",
    ...(refusedBody ? { connection: "close" } : {}),
    ...extraHeaders,
  });
  response.end(body);
  if (refusedBody) response.once("finish", () => response.req?.destroy());
}

/**
 * Reads a body up to `limit` bytes. Past the limit (declared or streamed) it stops
 * reading at once: the error response closes the connection, so the rest of the
 * body is never read or held.
 */
async function readBody(request: IncomingMessage, limit: number): Promise<Uint8Array> {
  const declared = Number(request.headers["content-length"] ?? 0);
  if (declared > limit) throw tooLarge(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of request) {
    size += (chunk as Buffer).byteLength;
    if (size > limit) throw tooLarge(limit);
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}

function tooLarge(limit: number): AgentVmError {
  return new AgentVmError(
    "PAYLOAD_TOO_LARGE",
    `request body is larger than the server's limit of ${limit} bytes (start({ limits: { maxBodyBytes } }) / AGENTVM_MAX_BODY_BYTES); send big data in pieces or through vmFetch, which streams`,
  );
}

function decodeKey(raw: string): string {
  let key: string;
  try {
    key = decodeURIComponent(raw);
  } catch {
    throw new AgentVmError("MALFORMED_REQUEST", "VM key in the URL is not valid percent-encoding (e.g. %ff); encode it with encodeURIComponent");
  }
  if (key.length === 0 || key.length > MAX_KEY_LENGTH) {
    throw new AgentVmError("INVALID_ARGUMENT", `VM key must be 1 to ${MAX_KEY_LENGTH} characters, got ${key.length}`);
  }
  if (/[\u0000-\u001f\u007f]/.test(key)) throw new AgentVmError("INVALID_ARGUMENT", "VM key must not contain control characters");
  return key;
}

type Route =
  | { kind: "health" }
  | { kind: "openapi" }
  | { kind: "tokens" }
  | { kind: "revokeToken"; id: string }
  | { kind: "definitions" }
  | { kind: "list"; definition: string }
  | {
      kind: "vm";
      definition: string;
      key: string;
      route: "actions" | "fetch" | "events" | "status" | "terminal" | "destroy" | TransferRoute;
      /** The action name or the port ("" for events and status). */
      segment: string;
      /** What a token's actions list must hold for this request. */
      action: string;
      /** The path after the route (the guest's path on the fetch route). */
      rest: string | undefined;
    };

/**
 * Definition names setup() refuses because a route of their own would collide with a
 * server route. `DELETE /api/tokens/{id}` revokes a token, and a definition named
 * `tokens` would own the same path as its destroy route (`DELETE /api/{definition}/{key}`):
 * one of the two would have to lose. A clear error at start-up, with a one-word rename,
 * beats a route that silently means something else (and keeps the URL scheme the same
 * for every client, curl included). Other server paths (`/api/definitions`) are one
 * segment long and no VM route is, so they need no reservation.
 */
export const RESERVED_DEFINITION_NAMES: ReadonlySet<string> = new Set(["tokens"]);

/** `/api/tokens/{id}`: DELETE revokes a scoped token. */
const TOKEN_ITEM = /^\/api\/tokens\/([^/]+)$/;
const VM_ROUTE = new RegExp(`^/api/([^/]+)/([^/]+)/(actions/[^/]+|fetch/[^/]+|events|status|terminal|${TRANSFER_ROUTES.join("|")})(/.*)?$`);
/** `/api/{definition}/{key}`: GET /api/{definition}/vms lists, DELETE destroys the VM `key` (which may be "vms"). */
const VM_ITEM = /^\/api\/([^/]+)\/([^/]+)$/;

/** Paths answered without credentials: they reveal nothing about any VM. */
const PUBLIC_PATHS: ReadonlySet<string> = new Set(["/health", "/openapi.json"]);

/** Largest page of GET /api/{definition}/vms. */
export const MAX_LIST_LIMIT = 1000;

function decodeDefinition(raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new AgentVmError("MALFORMED_REQUEST", "the definition name in the URL is not valid percent-encoding (e.g. %ff); encode it with encodeURIComponent");
  }
}

export function resolveRoute(context: ApiContext, request: IncomingMessage, url: URL): Route {
  if (url.pathname === "/health") return { kind: "health" };
  if (url.pathname === "/openapi.json" && request.method === "GET") return { kind: "openapi" };
  if (url.pathname === "/api/tokens") {
    if (request.method !== "POST") throw new AgentVmError("UNKNOWN_ACTION", `tokens are minted with POST, not ${request.method}`);
    return { kind: "tokens" };
  }
  const revoke = TOKEN_ITEM.exec(url.pathname);
  // Unconditional: no definition may be named `tokens` (RESERVED_DEFINITION_NAMES).
  if (revoke) {
    if (request.method !== "DELETE") throw new AgentVmError("UNKNOWN_ACTION", `a token is revoked with DELETE, not ${request.method}`);
    return { kind: "revokeToken", id: decodeKey(revoke[1]!) };
  }
  if (url.pathname === "/api/definitions") {
    if (request.method !== "GET") throw new AgentVmError("UNKNOWN_ACTION", `definitions are listed with GET, not ${request.method}`);
    return { kind: "definitions" };
  }
  const item = VM_ITEM.exec(url.pathname);
  if (item && (request.method === "DELETE" || (request.method === "GET" && item[2] === "vms"))) {
    const definition = decodeDefinition(item[1]!);
    if (!context.hasDefinition(definition)) throw new AgentVmError("UNKNOWN_ACTION", `no VM definition named ${JSON.stringify(definition)} in this registry`);
    if (request.method === "GET") return { kind: "list", definition };
    return { kind: "vm", definition, key: decodeKey(item[2]!), route: "destroy", segment: "", action: "destroy", rest: undefined };
  }
  const match = VM_ROUTE.exec(url.pathname);
  if (!match) throw new AgentVmError("UNKNOWN_ACTION", `no route ${request.method} ${url.pathname}; see docs/http-api.md`);
  const definition = decodeDefinition(match[1]!);
  if (!context.hasDefinition(definition)) throw new AgentVmError("UNKNOWN_ACTION", `no VM definition named ${JSON.stringify(definition)} in this registry`);
  const key = decodeKey(match[2]!);
  const [route, segment = ""] = match[3]!.split("/") as ["actions" | "fetch" | "events" | "status" | "terminal" | TransferRoute, string | undefined];
  const action = isTransferRoute(route) ? transferAction(route, request.method) : route === "actions" ? segment : route === "fetch" ? "vmFetch" : route === "events" ? "connect" : route === "terminal" ? "openTerminal" : "status";
  return { kind: "vm", definition, key, route, segment, action, rest: match[4] };
}

/**
 * The request dispatcher for everything that is not a preview: the one place
 * where Host, origin, credentials and content type are checked, in that order,
 * before any route does work (or creates a VM actor).
 */
export async function handleApi(context: ApiContext, request: IncomingMessage, response: ServerResponse): Promise<void> {
  try {
    context.origins.checkHost(request);
    context.origins.checkOrigin(request);
    const url = new URL(request.url ?? "/", "http://localhost");
    if (isDashboardPath(url.pathname)) {
      await serveDashboard(request, response, url.pathname);
      return;
    }
    // Credentials first (401 before 404), except for the health probe.
    const credentialHeader = request.headers[AUTH_HEADER] !== undefined ? AUTH_HEADER : "authorization";
    const credential = PUBLIC_PATHS.has(url.pathname) ? undefined : context.auth.authenticate(headerText(request.headers[credentialHeader]));
    const route = resolveRoute(context, request, url);
    if (route.kind === "health") {
      sendRaw(response, { ok: true });
      return;
    }
    if (route.kind === "openapi") {
      sendRaw(response, context.openApi());
      return;
    }
    if (route.kind === "tokens") {
      context.auth.requireApiKey(credential!, "minting a token (POST /api/tokens)");
      requireBodyType(request, "POST /api/tokens");
      await mintToken(context, request, response);
      return;
    }
    if (route.kind === "revokeToken") {
      context.auth.requireApiKey(credential!, "revoking a token (DELETE /api/tokens/{id})");
      sendJson(response, { revoked: await context.revokeToken(route.id) });
      return;
    }
    if (route.kind === "definitions") {
      context.auth.requireApiKey(credential!, "listing definitions (GET /api/definitions)");
      sendJson(response, context.definitions());
      return;
    }
    if (route.kind === "list") {
      context.auth.requireApiKey(credential!, `listing VMs (GET /api/${route.definition}/vms)`);
      sendJson(response, context.listVms(route.definition, listOptions(url)));
      return;
    }
    context.auth.authorize(credential!, route.definition, route.key, route.action);
    context.placement?.(route.definition, route.key);
    if (route.route === "destroy") {
      requireConfirmation(route.definition, route.key, url);
      sendJson(response, await context.destroyVm(route.definition, route.key));
      return;
    }
    if (route.route === "actions" && request.method === "POST") requireBodyType(request, `action ${route.segment}`);
    if (route.route === "fetch") refuseFormPost(request);
    // A status read creates nothing: asking about a million keys must not keep a million actors.
    if (route.route === "status" && route.rest === undefined && request.method === "GET") return sendJson(response, context.vmStatus(route.definition, route.key));
    const actor = context.actor(route.definition, route.key);
    if (!actor) throw new AgentVmError("UNKNOWN_ACTION", `no VM definition named ${JSON.stringify(route.definition)} in this registry`);
    // Held for the whole request, so even a request refused halfway lets the actor go idle (and be dropped).
    const release = actor.hold();
    try {
      if (route.route === "actions" && route.rest === undefined) await callAction(context, actor, route.segment, request, response);
      else if (route.route === "fetch") {
        // The credential is ours, not the guest's: it is not forwarded.
        const consumed = credential!.kind === "open" ? AUTH_HEADER : credentialHeader;
        await proxyFetch(actor, route.segment, `${route.rest ?? "/"}${url.search}`, request, response, consumed);
      } else if (route.route === "events" && route.rest === undefined) await streamEvents(actor, request, response);
      else if (isTransferRoute(route.route)) await serveTransfer(actor, route.route, route.rest, url, request, response);
      else if (route.route === "terminal") throw new AgentVmError("UPGRADE_REQUIRED", `${url.pathname} is a WebSocket route: connect with a WebSocket (the client: handle.openTerminal())`);
      else throw new AgentVmError("UNKNOWN_ACTION", `no route ${request.method} ${url.pathname}`);
    } finally {
      release();
    }
  } catch (error) {
    sendError(response, error);
  }
}

function listOptions(url: URL): { after?: string; limit: number } {
  const after = url.searchParams.get("after");
  const limitText = url.searchParams.get("limit");
  const limit = limitText === null ? MAX_LIST_LIMIT : Number(limitText);
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIST_LIMIT) {
    throw new AgentVmError("INVALID_ARGUMENT", `list VMs: limit must be an integer from 1 to ${MAX_LIST_LIMIT}, got ${JSON.stringify(limitText)}`);
  }
  return after === null ? { limit } : { after, limit };
}

/** A destroy names the key twice, once in the path and once as `?confirm=`, so a wrong path or a stray DELETE destroys nothing. */
function requireConfirmation(definition: string, key: string, url: URL): void {
  const confirm = url.searchParams.get("confirm");
  if (confirm === key) return;
  const how = `send DELETE /api/${encodeURIComponent(definition)}/${encodeURIComponent(key)}?confirm=${encodeURIComponent(key)} (the client: handle.destroy({ confirm: key }))`;
  throw new AgentVmError(
    "DESTROY_NOT_CONFIRMED",
    confirm === null
      ? `destroying VM ${JSON.stringify(key)} deletes its files and cannot be undone; confirm with the key: ${how}`
      : `destroying VM ${JSON.stringify(key)}: confirm ${JSON.stringify(confirm)} is not its key; nothing was changed. ${how}`,
  );
}

async function mintToken(context: ApiContext, request: IncomingMessage, response: ServerResponse): Promise<void> {
  const body = await readBody(request, TOKEN_BODY_LIMIT);
  let input: unknown;
  try {
    input = JSON.parse(Buffer.from(body).toString("utf8"));
  } catch (error) {
    throw new AgentVmError("MALFORMED_REQUEST", `POST /api/tokens: the body is not JSON (${(error as Error).message})`);
  }
  sendJson(response, context.auth.mintToken(input as TokenRequest));
}

function headerText(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(", ") : value;
}

function sendRaw(response: ServerResponse, value: unknown): void {
  const body = JSON.stringify(value);
  response.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  response.end(body);
}

function sendJson(response: ServerResponse, value: unknown): void {
  const body = JSON.stringify({ value });
  response.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  response.end(body);
}

async function callAction(context: ApiContext, actor: VmActor, action: string, request: IncomingMessage, response: ServerResponse): Promise<void> {
  if (request.method !== "POST") throw new AgentVmError("UNKNOWN_ACTION", `actions are called with POST, not ${request.method}`);
  if (!isVmAction(action)) throw new AgentVmError("UNKNOWN_ACTION", `unknown action ${JSON.stringify(action)}; see docs/http-api.md for the list`);
  const body = await readBody(request, context.maxBodyBytes);
  let args: unknown;
  try {
    args = decodeValue(String(request.headers["content-type"] ?? "application/json"), body);
  } catch (error) {
    const detail = error instanceof WireFormatError || error instanceof SyntaxError ? error.message : String(error);
    throw new AgentVmError("MALFORMED_REQUEST", `${action}: the request body is not a valid JSON args array or envelope (${detail})`);
  }
  if (args === null || args === undefined) args = [];
  if (!Array.isArray(args)) throw new AgentVmError("MALFORMED_REQUEST", `${action}: the body must carry an array of arguments, e.g. {"value": ["/home/agentos/a.txt"]}`);
  if (args.length > MAX_ACTION_ARGS) throw new AgentVmError("MALFORMED_REQUEST", `${action}: ${args.length} arguments; no action takes more than ${MAX_ACTION_ARGS}`);
  if (action === "exec" && wantsExecStream(request)) return streamExec(actor, args, response);
  const result = await actor.use((vm) => (vm[action] as (...a: unknown[]) => unknown).apply(vm, args as unknown[]));
  const wantsEnvelope = String(request.headers.accept ?? "").includes(ENVELOPE_TYPE);
  const encoded = encodeValue(result, { base64: !wantsEnvelope });
  response.writeHead(200, { "content-type": encoded.contentType, "content-length": typeof encoded.body === "string" ? Buffer.byteLength(encoded.body) : encoded.body.byteLength });
  response.end(encoded.body);
}

async function proxyFetch(actor: VmActor, portText: string, path: string, request: IncomingMessage, response: ServerResponse, credentialHeader: string): Promise<void> {
  const port = Number(portText);
  const forwardList = request.headers[FORWARD_HEADERS];
  let forward: Set<string> | undefined;
  if (typeof forwardList === "string") {
    try {
      forward = new Set((JSON.parse(forwardList) as string[]).map((name) => String(name).toLowerCase()));
    } catch {
      throw new AgentVmError("MALFORMED_REQUEST", `${FORWARD_HEADERS} must be a JSON array of header names`);
    }
    forward.add("content-length");
  }
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(request.headers)) {
    if (value === undefined || HOP_BY_HOP.has(name) || name === "host" || name === FORWARD_HEADERS || name === FETCH_TIMEOUT || name === AUTH_HEADER || name === credentialHeader) continue;
    if (forward && !forward.has(name)) continue;
    if (name === "content-length" && request.headers["transfer-encoding"]) continue;
    headers[name] = Array.isArray(value) ? value.join(", ") : value;
  }
  const timeoutMs = request.headers[FETCH_TIMEOUT];
  const hasBody = request.method !== "GET" && request.method !== "HEAD" && (request.headers["content-length"] !== "0" || request.headers["transfer-encoding"] !== undefined);
  const release = actor.hold();
  response.once("close", release);
  try {
    // Right after a wake, a restarted dev server may not listen yet: the connection waits for it (see VmActor).
    const upstream = await actor.use((vm) =>
      vm.vmFetchReadable(port, path, {
        method: request.method ?? "GET",
        headers,
        body: hasBody ? (request as AsyncIterable<Uint8Array>) : null,
        ...(typeof timeoutMs === "string" ? { timeoutMs: Number(timeoutMs) } : {}),
      }),
    );
    const outHeaders: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(upstream.headers)) {
      if (HOP_BY_HOP.has(name)) continue;
      const outName = forward && name === "content-encoding" ? CONTENT_ENCODING : name;
      outHeaders[outName] = name === "set-cookie" ? value.split("\n") : value;
    }
    const body = upstream.body;
    // The guest may have cut the body off before we got here; the body then emits nothing more.
    if (body.readableAborted) throw new AgentVmError("ECONNRESET", `vmFetch ${path} on port ${port}: the service in the VM closed the connection mid-response`);
    response.writeHead(upstream.status, upstream.statusText, outHeaders);
    // pipeline, not pipe: a body destroyed at any point ends the response instead of leaving it open.
    pipeline(body, response, (error) => {
      if (error) response.destroy(error);
    });
  } catch (error) {
    release();
    throw error;
  }
}


async function streamEvents(actor: VmActor, request: IncomingMessage, response: ServerResponse): Promise<void> {
  if (request.method !== "GET") throw new AgentVmError("UNKNOWN_ACTION", `events are read with GET, not ${request.method}`);
  const sinceParam = new URL(request.url ?? "/", "http://x").searchParams.get("since");
  const since = sinceParam === null ? undefined : Number(sinceParam);
  if (since !== undefined && !(Number.isSafeInteger(since) && since >= 0)) {
    throw new AgentVmError("INVALID_ARGUMENT", `events: since must be an output position (an integer ≥ 0), got ${JSON.stringify(sinceParam)}`);
  }
  const vm = await actor.wake();
  const release = actor.hold();
  const stream = new EventStream(response, () => {
    unsubscribe();
    release();
  });
  const output = (event: ProcessOutputEvent) => stream.send("processOutput", { pid: event.pid, stream: event.stream, seq: event.seq, data: { $base64: toBase64(event.data) } });
  // `?since=<seq>` first replays what the processes' logs hold after that position. Read and
  // subscribe in the same turn, so no event falls between the replay and the live ones.
  const backlog = since === undefined ? [] : vm.outputSince(since);
  const unsubscribe = actor.subscribe({
    processOutput: output,
    processExit: (event) => stream.send("processExit", event),
    destroyed: () => stream.closeWith(new AgentVmError("VM_DISPOSED", `VM ${JSON.stringify(actor.key)} was destroyed; its processes and files are gone (the key starts a fresh VM on next use)`)),
  });
  stream.open();
  for (const event of backlog) output(event);
}
