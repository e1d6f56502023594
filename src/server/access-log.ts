/**
 * Access logs: one JSON line per request, at level `info` (see src/log.ts):
 *
 *   {"time":"…","level":"info","msg":"request","listener":"api","method":"POST",
 *    "route":"/api/{definition}/{key}/actions/writeFile","definition":"vm","key":"demo",
 *    "status":200,"durationMs":3.1}
 *
 * `route` is the route's template, so lines group by route; preview tokens and
 * credentials never appear (a preview is `/preview/{token}/*`). A response the
 * client abandoned before it ended carries `"aborted": true`.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { isVmAction } from "../actions.ts";
import { log, logEnabled } from "../log.ts";

type Handler = (request: IncomingMessage, response: ServerResponse) => void;

const FIXED = new Set(["/health", "/openapi.json", "/api/tokens", "/api/definitions"]);

/** The route template of a path, with the VM it names (when it names one). */
export function describeRoute(pathname: string): { route: string; definition?: string; key?: string } {
  if (FIXED.has(pathname)) return { route: pathname };
  if (pathname === "/" || pathname.startsWith("/dashboard/")) return { route: "/dashboard" };
  if (/^\/preview\/[^/]*(\/.*)?$/.test(pathname)) return { route: "/preview/{token}/*" };
  // May carry a whole token (revoking by token): never logged.
  if (pathname.startsWith("/api/tokens/")) return { route: "/api/tokens/{id}" };
  const parts = pathname.split("/");
  if (parts[1] !== "api" || parts.length < 4) return { route: "(unknown)" };
  const definition = safeDecode(parts[2]!);
  if (parts.length === 4) return parts[3] === "vms" ? { route: "/api/{definition}/vms", definition } : { route: "/api/{definition}/{key}", definition, key: safeDecode(parts[3]!) };
  const key = safeDecode(parts[3]!);
  const base = "/api/{definition}/{key}";
  switch (parts[4]) {
    case "actions":
      return { route: `${base}/actions/${isVmAction(parts[5] ?? "") ? parts[5] : "{unknown}"}`, definition, key };
    case "fetch":
      return { route: `${base}/fetch/{port}/*`, definition, key };
    case "events":
    case "status":
      return { route: `${base}/${parts[4]}`, definition, key };
    case "files":
    case "tar":
    case "watch":
      return { route: `${base}/${parts[4]}/*`, definition, key };
    default:
      return { route: "(unknown)", definition, key };
  }
}

function safeDecode(text: string): string {
  let decoded = text;
  try {
    decoded = decodeURIComponent(text);
  } catch {
    // logged as sent
  }
  return decoded.length > 256 ? `${decoded.slice(0, 256)}…` : decoded;
}

/** Wraps a listener's handler so each request it answers is logged (when `info` is on). */
export function withAccessLog(listener: "api" | "preview", handler: Handler): Handler {
  return (request, response) => {
    if (logEnabled("info")) {
      const started = performance.now();
      response.once("close", () => {
        const pathname = (request.url ?? "/").split("?")[0]!;
        log("info", "request", {
          listener,
          method: request.method,
          ...describeRoute(pathname),
          status: response.statusCode,
          durationMs: Math.round((performance.now() - started) * 10) / 10,
          ...(response.writableFinished ? {} : { aborted: true }),
        });
      });
    }
    handler(request, response);
  };
}
