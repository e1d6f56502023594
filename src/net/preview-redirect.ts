/**
 * What the API origin answers for a preview request. Previews are served on
 * their own origin (DESIGN §3), never the API's, so that a page from a VM
 * cannot call the API with the user's ambient access. A preview URL sent to
 * the API origin — `endpoint + preview.path` in the seed code, or
 * `<token>.<previewHost>` pointed at the API port — is redirected there:
 *
 * - 307 (method and body kept) with `Location` on the preview origin; fetch
 *   and browser navigations follow it. It carries `Access-Control-Allow-Origin: *`
 *   like every preview answer, so a cross-origin `fetch` may follow it too.
 * - A CORS preflight is answered here (204, as the gateway answers it):
 *   browsers do not follow redirects on preflights.
 * - A WebSocket upgrade cannot be redirected by a browser: it is refused with
 *   421 Misdirected Request, a `Location` and a body naming the preview origin.
 *
 * The answer reveals nothing a token holder does not know: no token is looked up.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import { CORS_MAX_AGE, CORS_METHODS, type PreviewGateway } from "./gateway.ts";

export class PreviewRedirect {
  readonly #gateway: PreviewGateway;
  readonly #origin: URL;

  /** `previewOrigin`: where previews are served, e.g. http://localhost:6421. */
  constructor(gateway: PreviewGateway, previewOrigin: string) {
    this.#gateway = gateway;
    this.#origin = new URL(previewOrigin);
  }

  /** True when the request was a preview request (and it has been answered). */
  handleRequest(request: IncomingMessage, response: ServerResponse): boolean {
    const location = this.#gateway.previewLocation(request, this.#origin);
    if (location === undefined) return false;
    if (request.method === "OPTIONS" && request.headers["access-control-request-method"]) {
      response.writeHead(204, {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": CORS_METHODS,
        "access-control-allow-headers": String(request.headers["access-control-request-headers"] ?? "*"),
        "access-control-max-age": CORS_MAX_AGE,
        "content-length": "0",
      });
      response.end();
      return true;
    }
    const body = `Previews are served on ${this.#origin.origin}, not on the API's origin: ${location}\n`;
    response.writeHead(307, {
      location,
      "content-type": "text/plain; charset=utf-8",
      "content-length": Buffer.byteLength(body),
      "cache-control": "no-store",
      "referrer-policy": "no-referrer",
      "access-control-allow-origin": "*",
    });
    response.end(request.method === "HEAD" ? undefined : body);
    return true;
  }

  /** True when the upgrade was for a preview (and it has been refused). */
  handleUpgrade(request: IncomingMessage, socket: Duplex): boolean {
    const location = this.#gateway.previewLocation(request, this.#origin);
    if (location === undefined) return false;
    const wsLocation = location.replace(/^http/, "ws");
    const body = `Preview WebSockets are served on the preview origin, not on the API's: connect to ${wsLocation}\n`;
    socket.on("error", () => {});
    socket.end(
      `HTTP/1.1 421 Misdirected Request\r\nlocation: ${wsLocation}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n${body}`,
    );
    return true;
  }
}
