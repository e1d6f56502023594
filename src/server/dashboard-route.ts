/**
 * The dashboard: a static page at `/` that shows VMs, their processes and logs,
 * listening ports with preview links, preview tokens, and a terminal.
 *
 * The page and its scripts hold no data, so they are served without
 * credentials; everything they show comes from the HTTP API, which checks the
 * credential the page sends (the API key or token the user enters, kept in
 * sessionStorage) exactly as it checks any client's. The page is served on the
 * API's origin — never the preview origin — so a preview page cannot script it,
 * and it may not be framed (frame-ancestors 'none').
 *
 * Files come from disk as they are: plain ES modules with no build step, and
 * xterm.js from its npm package.
 */
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { IncomingMessage, ServerResponse } from "node:http";
import { AgentVmError } from "../errors.ts";

const PAGE_DIR = fileURLToPath(new URL("../dashboard/", import.meta.url));
const PAGE_FILES = ["app.js", "api.js", "terminal.js", "style.css"];
const JS = "text/javascript; charset=utf-8";
const CSS = "text/css; charset=utf-8";

/**
 * URL path → file. Nothing else is served, so no path from a request ever
 * reaches the filesystem. xterm.js is looked up on first use: a broken install
 * then costs the terminal, not the server's start.
 */
const files = (() => {
  let map: Map<string, { file: string; type: string }> | undefined;
  return () => {
    if (map) return map;
    const require = createRequire(import.meta.url);
    const xterm = dirname(require.resolve("@xterm/xterm/package.json"));
    const fit = dirname(require.resolve("@xterm/addon-fit/package.json"));
    map = new Map([
      ["/", { file: join(PAGE_DIR, "index.html"), type: "text/html; charset=utf-8" }],
      ...PAGE_FILES.map((name): [string, { file: string; type: string }] => [`/dashboard/${name}`, { file: join(PAGE_DIR, name), type: name.endsWith(".css") ? CSS : JS }]),
      ["/dashboard/vendor/xterm.mjs", { file: join(xterm, "lib", "xterm.mjs"), type: JS }],
      ["/dashboard/vendor/xterm.css", { file: join(xterm, "css", "xterm.css"), type: CSS }],
      ["/dashboard/vendor/addon-fit.mjs", { file: join(fit, "lib", "addon-fit.mjs"), type: JS }],
    ]);
    return map;
  };
})();

const SECURITY_HEADERS = {
  // Scripts and styles only from this origin; the API and the terminal WebSocket on it too.
  // Preview links open the preview origin in a new tab, which needs no CSP entry.
  "content-security-policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "cache-control": "no-cache",
};

/** Whether a path is one of the dashboard's files (checked before credentials: the page itself carries none). */
export function isDashboardPath(pathname: string): boolean {
  return pathname === "/" || pathname.startsWith("/dashboard/");
}

const cache = new Map<string, Buffer>();

export async function serveDashboard(request: IncomingMessage, response: ServerResponse, pathname: string): Promise<void> {
  const entry = files().get(pathname);
  if (!entry) throw new AgentVmError("UNKNOWN_ACTION", `no dashboard file ${pathname}`);
  if (request.method !== "GET" && request.method !== "HEAD") throw new AgentVmError("UNKNOWN_ACTION", `the dashboard is read with GET, not ${request.method}`);
  let body = cache.get(entry.file);
  if (!body) {
    body = await readFile(entry.file);
    cache.set(entry.file, body);
  }
  response.writeHead(200, { "content-type": entry.type, "content-length": body.byteLength, ...SECURITY_HEADERS });
  response.end(request.method === "HEAD" ? undefined : body);
}
