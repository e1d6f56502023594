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
const require = createRequire(import.meta.url);
const XTERM_DIR = dirname(require.resolve("@xterm/xterm/package.json"));
const XTERM_FIT_DIR = dirname(require.resolve("@xterm/addon-fit/package.json"));

/** URL path → file. Nothing else under /dashboard/ is served, so no path from a request ever reaches the filesystem. */
const FILES: ReadonlyMap<string, { file: string; type: string }> = new Map([
  ["/", { file: join(PAGE_DIR, "index.html"), type: "text/html; charset=utf-8" }],
  ["/dashboard/app.js", { file: join(PAGE_DIR, "app.js"), type: "text/javascript; charset=utf-8" }],
  ["/dashboard/api.js", { file: join(PAGE_DIR, "api.js"), type: "text/javascript; charset=utf-8" }],
  ["/dashboard/terminal.js", { file: join(PAGE_DIR, "terminal.js"), type: "text/javascript; charset=utf-8" }],
  ["/dashboard/style.css", { file: join(PAGE_DIR, "style.css"), type: "text/css; charset=utf-8" }],
  ["/dashboard/vendor/xterm.mjs", { file: join(XTERM_DIR, "lib", "xterm.mjs"), type: "text/javascript; charset=utf-8" }],
  ["/dashboard/vendor/xterm.css", { file: join(XTERM_DIR, "css", "xterm.css"), type: "text/css; charset=utf-8" }],
  ["/dashboard/vendor/addon-fit.mjs", { file: join(XTERM_FIT_DIR, "lib", "addon-fit.mjs"), type: "text/javascript; charset=utf-8" }],
]);

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
  return FILES.has(pathname);
}

const cache = new Map<string, Buffer>();

export async function serveDashboard(request: IncomingMessage, response: ServerResponse, pathname: string): Promise<void> {
  const entry = FILES.get(pathname);
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
