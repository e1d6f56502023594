/**
 * The preview gateway: browser traffic for `/preview/<token>/…` (path mode) or
 * `<token>.<previewHost>` (subdomain mode) proxied to one port of one VM
 * through its socket table. HTTP bodies stream both ways with backpressure;
 * WebSocket upgrades become a raw byte relay; Server-Sent Events pass through
 * unbuffered.
 *
 * The guest sees a request as if made to `localhost:<port>` directly: the token
 * never reaches it (it is stripped from the path, Host, Origin and Referer), and
 * X-Forwarded-* say where the request really came from.
 *
 * Everything per request that can be decided once is decided at construction.
 */
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import { AgentVmError } from "../errors.ts";
import type { PreviewRow, PreviewStore } from "../store/preview-store.ts";
import type { Vm } from "../vm.ts";
import { findToken, hashToken, tokenOwner } from "./previews.ts";

export interface GatewayOptions {
  store: PreviewStore;
  /**
   * Cluster nodes: tokens that name another node (`<random>-<node>`) are passed to
   * `forward` instead of being looked up here; `self` is this node's name.
   */
  elsewhere?: {
    self: string;
    forward(owner: string, request: IncomingMessage, response: ServerResponse): Promise<boolean>;
    forwardUpgrade(owner: string, request: IncomingMessage, socket: Duplex, head: Buffer): Promise<boolean>;
  };
  /** Limits the gateway to some tokens' VMs (an embedded VM serves only its own); others get the 403. */
  owns?(row: PreviewRow): boolean;
  /** Wakes the token's VM and keeps it awake until `release` is called. */
  acquire(row: PreviewRow): Promise<{ vm: Vm; release(): void }>;
  /** Host suffix for subdomain mode (default "preview.localhost"). */
  previewHost?: string;
  /** A guest that has not started its response by then gets a 504 (default 60 s). */
  responseTimeoutMs?: number;
  /** Largest request body passed to a guest; unset means no cap. */
  maxBodyBytes?: number;
}

const FORBIDDEN_BODY = "Forbidden: this preview link is invalid, expired or revoked.\n";
const PREVIEW_PATH = /^\/preview\/([^/?#]*)(\/[^?#]*)?$/;
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"]);
/** What preview preflights allow, here and on the API origin's redirect (preview-redirect.ts). */
export const CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
export const CORS_MAX_AGE = "86400";
/** lastUsedAt is advisory: written at most this often per token. */
const TOUCH_EVERY_MS = 10_000;

interface Target {
  token: string;
  /** Path and query the guest sees. */
  path: string;
  /** What precedes the guest's path in the browser's URL ("" in subdomain mode). */
  prefix: string;
  publicHost: string;
}

export class PreviewGateway {
  readonly #options: GatewayOptions;
  readonly #previewHost: string;
  readonly #timeoutMs: number;
  readonly #touched = new Map<string, number>();

  constructor(options: GatewayOptions) {
    this.#options = options;
    this.#previewHost = (options.previewHost ?? "preview.localhost").toLowerCase();
    this.#timeoutMs = options.responseTimeoutMs ?? 60_000;
  }

  /** The subdomain-mode host suffix, lowercased (e.g. "preview.localhost"). */
  get previewHost(): string {
    return this.#previewHost;
  }

  /** True when the request is for the gateway (and it has been answered). */
  handleRequest(request: IncomingMessage, response: ServerResponse): boolean {
    const target = this.#target(request);
    if (!target) return false;
    // A failure here must not become an unhandled rejection (which ends the server process).
    this.#serve(request, response, target).catch((error: unknown) => {
      if (response.headersSent) return void response.destroy();
      this.#page(response, 502, "Preview error", `The gateway could not pass this request on: ${AgentVmError.from(error).message}`);
    });
    return true;
  }

  /**
   * The URL this request names on the preview origin (`origin`, e.g.
   * http://localhost:6421), or undefined when it is not a preview request.
   * Path mode keeps the path; subdomain mode keeps the `<token>.<previewHost>`
   * name and takes the origin's scheme and port. For the API origin, which
   * redirects there instead of serving previews itself.
   */
  previewLocation(request: IncomingMessage, origin: URL): string | undefined {
    const target = this.#target(request);
    if (!target) return undefined;
    const rawUrl = request.url?.startsWith("/") ? request.url : "/";
    if (target.prefix) return `${origin.origin}${rawUrl}`;
    return `${origin.protocol}//${target.token}.${this.#previewHost}${origin.port ? `:${origin.port}` : ""}${rawUrl}`;
  }

  handleUpgrade(request: IncomingMessage, socket: Duplex, head: Buffer): boolean {
    const target = this.#target(request);
    if (!target) return false;
    this.#relay(request, socket, head, target).catch(() => socket.destroy());
    return true;
  }

  #target(request: IncomingMessage): Target | undefined {
    const rawUrl = request.url ?? "/";
    const host = String(request.headers.host ?? "").toLowerCase();
    const hostname = host.replace(/:\d+$/, "");
    const query = rawUrl.includes("?") ? rawUrl.slice(rawUrl.indexOf("?")) : "";
    const pathOnly = rawUrl.slice(0, rawUrl.length - query.length);
    if (hostname.endsWith(`.${this.#previewHost}`)) {
      const token = hostname.slice(0, -(this.#previewHost.length + 1));
      return { token, path: rawUrl, prefix: "", publicHost: host.slice(token.length + 1) };
    }
    const match = PREVIEW_PATH.exec(pathOnly);
    if (!match) return undefined;
    return { token: match[1]!, path: `${match[2] ?? "/"}${query}`, prefix: `/preview/${match[1]}`, publicHost: host };
  }

  async #serve(request: IncomingMessage, response: ServerResponse, target: Target): Promise<void> {
    response.setHeader("access-control-allow-origin", "*");
    response.setHeader("referrer-policy", "no-referrer");
    if (request.method === "OPTIONS" && request.headers["access-control-request-method"]) {
      // Preflights never carry credentials and never reach the guest.
      response.writeHead(204, {
        "access-control-allow-methods": CORS_METHODS,
        "access-control-allow-headers": String(request.headers["access-control-request-headers"] ?? "*"),
        "access-control-max-age": CORS_MAX_AGE,
        "content-length": "0",
      });
      response.end();
      return;
    }
    const owner = this.#ownerElsewhere(target.token);
    if (owner !== undefined) {
      if (await this.#options.elsewhere!.forward(owner, request, response)) return;
      return this.#forbidden(response);
    }
    const row = this.#find(target.token);
    if (!row) return this.#forbidden(response);
    const declared = Number(request.headers["content-length"] ?? 0);
    const cap = this.#options.maxBodyBytes;
    if (cap !== undefined && declared > cap) {
      return this.#page(response, 413, "Request too large", `This preview accepts request bodies up to ${cap} bytes.`);
    }
    this.#touch(target.token);
    let lease: { vm: Vm; release(): void };
    try {
      lease = await this.#options.acquire(row);
    } catch (error) {
      return this.#page(response, 503, "Preview unavailable", `The VM behind this preview could not start: ${AgentVmError.from(error).message}`);
    }
    response.once("close", () => lease.release());

    const upstream = lease.vm.httpRequest(row.port, { method: request.method ?? "GET", path: target.path, headers: this.#requestHeaders(request, row.port, target) });
    const timer = setTimeout(() => upstream.destroy(new AgentVmError("ETIMEDOUT", "no response")), this.#timeoutMs);
    upstream.once("response", (answer) => {
      clearTimeout(timer);
      response.writeHead(answer.statusCode ?? 502, answer.statusMessage, this.#responseHeaders(answer, target));
      // A body of unknown length (Server-Sent Events, streams): headers now, each chunk as it comes.
      // With a length, headers and body leave together in one write.
      if (answer.headers["content-length"] === undefined) response.flushHeaders();
      answer.pipe(response);
      answer.once("error", () => response.destroy());
    });
    upstream.once("error", (error) => {
      clearTimeout(timer);
      const code = (error as { code?: string }).code;
      if (response.headersSent) return void response.destroy();
      if (code === "ECONNREFUSED") {
        this.#page(response, 502, "Nothing is listening yet", `The preview points at port ${row.port} inside the VM, but no program is listening there. Start the server in the VM, then reload this page.`);
      } else if (code === "ETIMEDOUT") {
        this.#page(response, 504, "The app did not answer", `The program on port ${row.port} inside the VM did not start a response within ${Math.round(this.#timeoutMs / 1000)} seconds.`);
      } else {
        this.#page(response, 502, "The app closed the connection", `The program on port ${row.port} inside the VM ended the connection before answering.`);
      }
    });
    // A client that goes away mid-stream ends the guest's side too.
    response.once("close", () => {
      clearTimeout(timer);
      if (!response.writableFinished) upstream.destroy();
    });
    if (cap !== undefined) {
      let seen = 0;
      request.on("data", (chunk: Buffer) => {
        seen += chunk.byteLength;
        if (seen > cap) {
          upstream.destroy();
          if (!response.headersSent) this.#page(response, 413, "Request too large", `This preview accepts request bodies up to ${cap} bytes.`);
          request.destroy();
        }
      });
    }
    request.pipe(upstream);
  }

  async #relay(request: IncomingMessage, socket: Duplex, head: Buffer, target: Target): Promise<void> {
    socket.on("error", () => {});
    const owner = this.#ownerElsewhere(target.token);
    if (owner !== undefined) {
      if (await this.#options.elsewhere!.forwardUpgrade(owner, request, socket, head)) return;
      return this.#rawRefuse(socket, 403, FORBIDDEN_BODY);
    }
    const row = this.#find(target.token);
    if (!row) return this.#rawRefuse(socket, 403, FORBIDDEN_BODY);
    this.#touch(target.token);
    let lease: { vm: Vm; release(): void };
    let upstream: Duplex;
    try {
      lease = await this.#options.acquire(row);
    } catch {
      return this.#rawRefuse(socket, 503, "The VM behind this preview could not start.\n");
    }
    try {
      upstream = await lease.vm.connectToPort(row.port);
    } catch {
      lease.release();
      return this.#rawRefuse(socket, 502, `Nothing is listening on port ${row.port} inside the VM.\n`);
    }
    const headers = this.#requestHeaders(request, row.port, target, true);
    const lines = [`${request.method} ${target.path} HTTP/1.1`];
    for (const [name, value] of Object.entries(headers)) {
      for (const item of Array.isArray(value) ? value : [value]) lines.push(`${name}: ${item}`);
    }
    upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
    if (head.byteLength > 0) upstream.write(head);
    upstream.pipe(socket);
    socket.pipe(upstream);
    let released = false;
    const finish = () => {
      if (released) return;
      released = true;
      upstream.destroy();
      socket.destroy();
      lease.release();
    };
    upstream.once("close", finish);
    socket.once("close", finish);
    upstream.on("error", finish);
  }

  #requestHeaders(request: IncomingMessage, port: number, target: Target, upgrade = false): OutgoingHttpHeaders {
    const headers: OutgoingHttpHeaders = {};
    const local = `localhost:${port}`;
    for (const [name, value] of Object.entries(request.headers)) {
      if (value === undefined || name === "host" || name.startsWith("x-forwarded-")) continue;
      if (HOP_BY_HOP.has(name) && !(upgrade && (name === "connection" || name === "upgrade"))) continue;
      headers[name] = value;
    }
    headers.host = local;
    // The token must not reach the guest: rewrite what would carry it.
    if (typeof headers.origin === "string" && headers.origin !== "null") headers.origin = `http://${local}`;
    if (typeof headers.referer === "string") {
      // Dropped, not set to undefined: http.request throws on an undefined header value.
      const referer = this.#localReferer(headers.referer, local, target);
      if (referer === undefined) delete headers.referer;
      else headers.referer = referer;
    }
    const encrypted = Boolean((request.socket as { encrypted?: boolean }).encrypted);
    const forwardedFor = request.headers["x-forwarded-for"];
    headers["x-forwarded-for"] = [forwardedFor, request.socket.remoteAddress].filter(Boolean).join(", ");
    headers["x-forwarded-host"] = target.publicHost;
    headers["x-forwarded-proto"] = encrypted ? (upgrade ? "wss" : "https") : upgrade ? "ws" : "http";
    headers["x-forwarded-prefix"] = target.prefix === "" ? "/" : "/preview/-";
    return headers;
  }

  /**
   * A Referer from the preview itself is rewritten to the guest's view; one from another preview is dropped.
   * Decided by what the URL carries, not by its host: the gateway answers under several names
   * (localhost, 127.0.0.1, [::1], a proxy's), and a Referer naming another of them still holds the token.
   */
  #localReferer(referer: string, local: string, target: Target): string | undefined {
    let url: URL;
    try {
      url = new URL(referer);
    } catch {
      return undefined;
    }
    const hostname = url.hostname.toLowerCase();
    if (hostname.endsWith(`.${this.#previewHost}`)) {
      return hostname === `${target.token}.${this.#previewHost}` ? `http://${local}${url.pathname}${url.search}` : undefined;
    }
    const own = `/preview/${target.token}`;
    if (url.pathname === own || url.pathname.startsWith(`${own}/`)) return `http://${local}${url.pathname.slice(own.length) || "/"}${url.search}`;
    return url.pathname.startsWith("/preview/") ? undefined : referer;
  }

  #responseHeaders(answer: IncomingMessage, target: Target): OutgoingHttpHeaders {
    const headers: OutgoingHttpHeaders = {};
    for (const [name, value] of Object.entries(answer.headers)) {
      if (value === undefined || HOP_BY_HOP.has(name) || name.startsWith("access-control-") || name === "referrer-policy") continue;
      headers[name] = value;
    }
    headers["access-control-allow-origin"] = "*";
    headers["access-control-expose-headers"] = "*";
    headers["referrer-policy"] = "no-referrer";
    const cookies = headers["set-cookie"];
    if (target.prefix) {
      const location = headers.location;
      if (typeof location === "string") headers.location = this.#rewriteLocation(location, target);
      if (Array.isArray(cookies)) headers["set-cookie"] = cookies.map((cookie) => this.#rewriteCookie(cookie, target.prefix));
    } else if (Array.isArray(cookies)) {
      // Host-only cookies: a `Domain=preview.localhost` cookie would reach every other VM's preview.
      headers["set-cookie"] = cookies.map((cookie) => withoutDomain(cookie));
    }
    return headers;
  }

  /** Root-relative (and localhost-absolute) redirects stay under the preview prefix. */
  #rewriteLocation(location: string, target: Target): string {
    if (location.startsWith("/") && !location.startsWith("//")) return `${target.prefix}${location}`;
    const local = /^https?:\/\/(localhost|127\.0\.0\.1)(:\d+)?(\/.*)?$/i.exec(location);
    return local ? `${target.prefix}${local[3] ?? "/"}` : location;
  }

  #rewriteCookie(cookie: string, prefix: string): string {
    return withoutDomain(cookie)
      .split(";")
      .map((part) => part.replace(/^(\s*path=)(\/.*)$/i, (_all, key: string, path: string) => `${key}${prefix}${path}`))
      .join(";");
  }

  /** The cluster node a token names when it is not this one (its requests are passed there), else undefined. */
  #ownerElsewhere(token: string): string | undefined {
    const owner = tokenOwner(token);
    const elsewhere = this.#options.elsewhere;
    return owner !== undefined && elsewhere && owner !== elsewhere.self ? owner : undefined;
  }

  #find(token: string): PreviewRow | undefined {
    const row = findToken(this.#options.store, token);
    return row && (!this.#options.owns || this.#options.owns(row)) ? row : undefined;
  }

  #touch(token: string): void {
    const now = Date.now();
    const last = this.#touched.get(token) ?? 0;
    if (now - last < TOUCH_EVERY_MS) return;
    this.#touched.set(token, now);
    if (this.#touched.size > 10_000) this.#touched.clear();
    this.#options.store.touch(hashToken(token), now);
  }

  #forbidden(response: ServerResponse): void {
    response.writeHead(403, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(FORBIDDEN_BODY), "cache-control": "no-store" });
    response.end(FORBIDDEN_BODY);
  }

  #page(response: ServerResponse, status: number, title: string, text: string): void {
    const html = `<!doctype html><html><head><meta charset="utf-8"><title>${title}</title></head><body style="font-family:system-ui,sans-serif;max-width:40em;margin:4em auto"><h1>${title}</h1><p>${text}</p></body></html>\n`;
    response.writeHead(status, { "content-type": "text/html; charset=utf-8", "content-length": Buffer.byteLength(html), "cache-control": "no-store" });
    response.end(html);
  }

  #rawRefuse(socket: Duplex, status: number, body: string): void {
    const reason = status === 403 ? "Forbidden" : status === 502 ? "Bad Gateway" : "Service Unavailable";
    socket.end(
      `HTTP/1.1 ${status} ${reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n${body}`,
    );
  }
}

/** A Set-Cookie value without its Domain attribute (so the cookie is host-only). */
function withoutDomain(cookie: string): string {
  return cookie
    .split(";")
    .filter((part) => !/^\s*domain=/i.test(part))
    .join(";");
}
