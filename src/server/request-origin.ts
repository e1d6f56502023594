/**
 * Where an API request may come from: the Host it names, the browser page
 * that sent it, and whether its body is something a cross-site form could send.
 *
 * - Host (DNS rebinding): a page on an attacker's name that resolves to this
 *   server would send `Host: attacker.example`. Allowed are localhost and
 *   `*.localhost`, any IP literal (a page can only be same-origin with an IP URL
 *   if it was served from that address — as Vite reasons), the host the server
 *   listens on, and `allowedHosts` (exact names, or `.example.com` for a domain
 *   and its subdomains; `true` allows every name).
 * - Origin: a request carrying `Origin` must come from the API's own origin
 *   (same host and port as its Host header) or one of `allowedOrigins`. Without
 *   `Origin`, a `Sec-Fetch-Site` other than `same-origin` or `none` is refused.
 *   curl and server-side clients send neither and pass.
 * - Content type: bodies go to actions and /api/tokens only as JSON or the
 *   envelope type, which a browser cannot send cross-site without a preflight
 *   (the API answers no preflight). A POST to the fetch route may carry any
 *   body, but not as a simple form (no content type, text/plain, urlencoded,
 *   multipart) unless it names its headers with x-agentvm-forward-headers.
 *
 * Everything that can be decided once is decided at construction.
 */
import type { IncomingMessage } from "node:http";
import { isIP } from "node:net";
import { AgentVmError, invalidArgument } from "../errors.ts";
import { ENVELOPE_TYPE, FORWARD_HEADERS } from "../wire.ts";
import { describe } from "../validate.ts";

export interface OriginPolicyOptions {
  /** The host the server listens on. */
  host: string;
  /** More Host names to accept: exact, or ".example.com" / "*.example.com" for a domain and its subdomains; true accepts any. */
  allowedHosts?: readonly string[] | true;
  /** Browser origins (e.g. "https://app.example.com") that may call the API besides its own. */
  allowedOrigins?: readonly string[];
}

const BODY_TYPES = new Set(["application/json", ENVELOPE_TYPE]);
/** Content types a page on another site can POST without a CORS preflight. */
const FORM_TYPES = new Set(["", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]);

/** The host name of a Host header value: lowercased, without port, brackets or a trailing dot. */
export function hostName(hostHeader: string): string {
  const value = hostHeader.trim().toLowerCase();
  const name = value.startsWith("[") ? value.slice(1, value.indexOf("]") === -1 ? undefined : value.indexOf("]")) : value.replace(/:\d*$/, "");
  return name.endsWith(".") ? name.slice(0, -1) : name;
}

/** True for names that always mean this machine's loopback. */
export function isLoopbackHost(host: string): boolean {
  const name = hostName(host);
  if (name === "localhost" || name.endsWith(".localhost") || name === "::1") return true;
  return isIP(name) === 4 && name.startsWith("127.");
}

function mediaType(request: IncomingMessage): string {
  return String(request.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
}

export class OriginPolicy {
  readonly #anyHost: boolean;
  readonly #exact: ReadonlySet<string>;
  readonly #suffixes: readonly string[];
  readonly #origins: ReadonlySet<string>;

  constructor(options: OriginPolicyOptions) {
    const allowed = options.allowedHosts ?? [];
    if (allowed !== true && !Array.isArray(allowed)) throw invalidArgument(`allowedHosts must be an array of host names or true, got ${describe(allowed)}`);
    this.#anyHost = allowed === true;
    const exact = new Set<string>([hostName(options.host)]);
    const suffixes: string[] = [];
    for (const entry of allowed === true ? [] : allowed) {
      if (typeof entry !== "string" || entry.length === 0) throw invalidArgument(`allowedHosts entries must be host names, got ${describe(entry)}`);
      const name = entry.toLowerCase().replace(/^\*(?=\.)/, "");
      if (name.startsWith(".")) {
        suffixes.push(name);
        exact.add(name.slice(1));
      } else exact.add(hostName(name));
    }
    this.#exact = exact;
    this.#suffixes = suffixes;
    const origins = options.allowedOrigins ?? [];
    if (!Array.isArray(origins)) throw invalidArgument(`allowedOrigins must be an array of origins, got ${describe(origins)}`);
    this.#origins = new Set(
      origins.map((origin: unknown) => {
        try {
          if (typeof origin !== "string") throw new Error();
          const url = new URL(origin);
          if (url.origin === "null") throw new Error();
          return url.origin;
        } catch {
          throw invalidArgument(`allowedOrigins entries must be origins like "https://app.example.com", got ${describe(origin)}`);
        }
      }),
    );
  }

  /** HOST_NOT_ALLOWED unless the Host header names this server. A request without Host (HTTP/1.0) is no browser's. */
  checkHost(request: IncomingMessage): void {
    const header = request.headers.host;
    if (header === undefined || this.#anyHost) return;
    const name = hostName(header);
    if (name === "localhost" || name.endsWith(".localhost") || isIP(name) !== 0 || this.#exact.has(name)) return;
    if (this.#suffixes.some((suffix) => name.endsWith(suffix))) return;
    throw new AgentVmError("HOST_NOT_ALLOWED", `Host ${JSON.stringify(header)} is not allowed on this server (DNS rebinding defence); add it to start({ allowedHosts })`);
  }

  /** ORIGIN_NOT_ALLOWED for a browser request from a page this server does not trust. */
  checkOrigin(request: IncomingMessage): void {
    const origin = request.headers.origin;
    if (origin !== undefined) {
      if (this.#trusted(origin, request.headers.host)) return;
      throw new AgentVmError("ORIGIN_NOT_ALLOWED", `requests from the page origin ${JSON.stringify(origin)} are refused; add it to start({ allowedOrigins }) if that site should call the API`);
    }
    const site = request.headers["sec-fetch-site"];
    if (site === undefined || site === "same-origin" || site === "none") return;
    throw new AgentVmError("ORIGIN_NOT_ALLOWED", `a ${site} browser request is refused; the API answers only its own origin and start({ allowedOrigins })`);
  }

  #trusted(origin: string, host: string | undefined): boolean {
    let url: URL;
    try {
      url = new URL(origin);
    } catch {
      return false;
    }
    if (url.origin === "null") return false;
    if (this.#origins.has(url.origin)) return true;
    return host !== undefined && (url.protocol === "http:" || url.protocol === "https:") && url.host === host.trim().toLowerCase();
  }
}

/** UNSUPPORTED_MEDIA_TYPE unless an action or token body is JSON or the envelope type. */
export function requireBodyType(request: IncomingMessage, route: string): void {
  const type = mediaType(request);
  if (BODY_TYPES.has(type)) return;
  throw new AgentVmError(
    "UNSUPPORTED_MEDIA_TYPE",
    `${route}: send the body as content-type application/json (or ${ENVELOPE_TYPE}), not ${type === "" ? "without a content type" : JSON.stringify(type)}; with curl add -H 'content-type: application/json'`,
  );
}

/**
 * UNSUPPORTED_MEDIA_TYPE for an upload (PUT of a file or tar) without a content
 * type or with a form's: uploads declare what they carry (application/octet-stream,
 * application/x-tar), which no cross-site form can.
 */
export function refuseFormUpload(request: IncomingMessage, route: string): void {
  if (!FORM_TYPES.has(mediaType(request))) return;
  throw new AgentVmError(
    "UNSUPPORTED_MEDIA_TYPE",
    `${route}: send the body as content-type application/octet-stream (a file) or application/x-tar (an archive), not ${mediaType(request) || "without a content type"}; with curl add -H 'content-type: application/octet-stream'`,
  );
}

/** UNSUPPORTED_MEDIA_TYPE for a fetch-route POST shaped like a cross-site form. */
export function refuseFormPost(request: IncomingMessage): void {
  if (request.method !== "POST" || !FORM_TYPES.has(mediaType(request)) || request.headers[FORWARD_HEADERS] !== undefined) return;
  throw new AgentVmError(
    "UNSUPPORTED_MEDIA_TYPE",
    `vmFetch: a POST with ${mediaType(request) || "no content type"} is what a cross-site form sends, so it is refused; set another content type (e.g. application/json) or the header ${FORWARD_HEADERS} (a JSON array of the header names to forward)`,
  );
}
