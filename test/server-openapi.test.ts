/**
 * GET /openapi.json against the server it describes: every route the
 * dispatcher knows is in the document, every documented operation exists on
 * the running server and answers only statuses the document lists (with codes
 * docs/errors.md gives the same status), and docs/http-api.md lists every action.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { VM_ACTIONS } from "../src/actions.ts";
import { TRANSFER_ROUTES } from "../src/server/file-transfer-route.ts";
import { tempDataDir } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;

type Operation = { responses: Record<string, { content?: Record<string, { schema: { properties?: { error?: { properties: { code: { enum: string[] } } } } } }> }> };
type OpenApi = { openapi: string; paths: Record<string, Record<string, Operation>> };

const apiKey = generateApiKey();
const registry = setup({ use: { vm: agentOS({ sleepAfterMs: 500 }) } });
let server: RunningServer;
let document: OpenApi;

before(async () => {
  server = await registry.start({ port: 0, dataDir: await tempDataDir("agentvm-openapi-"), handleSignals: false, auth: { apiKeys: [apiKey] } });
  const response = await fetch(`${server.url}/openapi.json`);
  assert.equal(response.status, 200, "the document needs no credentials");
  document = (await response.json()) as OpenApi;
});
after(() => server?.close());

const errorsDoc = readFileSync(new URL("../docs/errors.md", import.meta.url), "utf8");
const documentedStatus = new Map([...errorsDoc.matchAll(/^\| `([A-Z_]+)` \| .+ \| (\d{3}|—) \|$/gm)].map((match) => [match[1]!, match[2]!]));
const METHODS = new Set(["get", "post", "put", "patch", "delete", "head", "options"]);

function operations(): { path: string; method: string; operation: Operation }[] {
  return Object.entries(document.paths).flatMap(([path, item]) =>
    Object.entries(item)
      .filter(([method]) => METHODS.has(method))
      .map(([method, operation]) => ({ path, method, operation })),
  );
}

describe("the OpenAPI document", () => {
  it("is OpenAPI 3.1 with one operation per action, generated from VM_ACTIONS", () => {
    assert.equal(document.openapi, "3.1.0");
    for (const action of VM_ACTIONS) {
      const item = document.paths[`/api/{definition}/{key}/actions/${action}`];
      assert.ok(item?.post, `action ${action} is missing from /openapi.json`);
    }
  });

  it("holds every route the dispatcher matches (read from src/server/http-api.ts)", () => {
    const source = readFileSync(new URL("../src/server/http-api.ts", import.meta.url), "utf8");
    const paths = Object.keys(document.paths);
    // The per-VM routes: the literal alternatives of VM_ROUTE (actions/…, fetch/…, events, status)
    // and the streamed file routes it is built with.
    const vmRoute = /const VM_ROUTE = (.+);/.exec(source)?.[1];
    assert.ok(vmRoute, "VM_ROUTE not found in http-api.ts");
    const literal = /\(((?:[a-z]+(?:\\?\/\[\^\/\]\+)?\|)+)/.exec(vmRoute)?.[1]?.split("|").filter(Boolean) ?? [];
    assert.ok(literal.length >= 4, `could not read the routes of ${vmRoute}`);
    const alternatives = [...literal, ...(vmRoute.includes("TRANSFER_ROUTES") ? TRANSFER_ROUTES : [])];
    for (const alternative of alternatives) {
      const segment = alternative.replace(/\\?\/.*$/, "");
      assert.ok(paths.some((path) => path.startsWith(`/api/{definition}/{key}/${segment}`)), `route …/${segment} is missing from /openapi.json`);
    }
    // Fixed paths the dispatcher compares against.
    for (const [, fixed] of source.matchAll(/url\.pathname === "([^"]+)"/g)) assert.ok(paths.includes(fixed!), `route ${fixed} is missing from /openapi.json`);
  });

  it("lists for each error status only codes docs/errors.md gives that status", () => {
    for (const { path, method, operation } of operations()) {
      for (const [status, response] of Object.entries(operation.responses)) {
        const codes = response.content?.["application/json"]?.schema.properties?.error?.properties.code.enum ?? [];
        for (const code of codes) assert.equal(documentedStatus.get(code), status, `${method.toUpperCase()} ${path}: ${code} is documented as ${documentedStatus.get(code)}, listed under ${status}`);
      }
    }
  });

  it("matches the real server: every operation exists and answers a status it lists", async () => {
    const checked: string[] = [];
    for (const { path, method, operation } of operations()) {
      if (method === "head" || method === "options") continue;
      const url = path
        .replace("{definition}", "vm")
        .replace("{key}", "openapi-probe")
        .replace("{port}", "3000")
        .replace("{path}", "probe");
      const controller = new AbortController();
      const withBody = method !== "get" && method !== "delete";
      const response = await fetch(`${server.url}${url}`, {
        method: method.toUpperCase(),
        headers: { authorization: `Bearer ${apiKey}`, ...(withBody ? { "content-type": "application/json", "x-agentvm-forward-headers": "[]" } : {}) },
        ...(withBody ? { body: path === "/api/tokens" ? "{}" : "[]" } : {}),
        signal: controller.signal,
      });
      const status = String(response.status);
      const isOurs = response.headers.get("x-agentvm-error") === "1";
      let code = "";
      if (isOurs) code = ((await response.json()) as { error: { code: string } }).error.code;
      else controller.abort(); // an event stream stays open
      assert.notEqual(code, "UNKNOWN_ACTION", `${method.toUpperCase()} ${url}: the server has no such route`);
      const listed = operation.responses[status] ?? (isOurs ? undefined : operation.responses.default);
      assert.ok(listed || (status.startsWith("2") && operation.responses["200"]), `${method.toUpperCase()} ${url} answered ${status} ${code}, which the document does not list`);
      if (code) {
        const codes = listed?.content?.["application/json"]?.schema.properties?.error?.properties.code.enum ?? [];
        assert.ok(codes.includes(code), `${method.toUpperCase()} ${url} answered ${status} ${code}; the document lists ${codes.join(", ")}`);
      }
      checked.push(`${method} ${path}`);
    }
    assert.ok(checked.length >= VM_ACTIONS.length + 8);
  });

  it("bad input on every route (no credential, foreign origin, oversized headers, wrong content type, malformed JSON) gets a typed error the document lists", async () => {
    const cases: string[] = [];
    for (const { path, method: lower, operation } of operations()) {
      if (lower === "head" || lower === "options") continue;
      // fetch upper-cases only some methods; "patch" would be sent as is (and refused as not HTTP).
      const method = lower.toUpperCase();
      const url = `${server.url}${path.replace("{definition}", "vm").replace("{key}", "bad-input").replace("{port}", "3000").replace("{path}", "x").replace("{id}", "x")}`;
      const isPublic = (operation as { security?: unknown[] }).security?.length === 0;
      const readsBody = path === "/api/tokens" || path.includes("/actions/");
      const auth = { authorization: `Bearer ${apiKey}` };
      const json = { "content-type": "application/json" };
      const attempts: [what: string, init: RequestInit, expected: string][] = [
        ["a foreign Origin", { method, headers: { ...auth, ...json, origin: "https://evil.example" }, ...(readsBody ? { body: "[]" } : {}) }, "ORIGIN_NOT_ALLOWED"],
        ["headers over the cap", { method, headers: { ...auth, "x-padding": "p".repeat(64 * 1024) } }, "HEADERS_TOO_LARGE"],
      ];
      if (!isPublic) attempts.push(["no credential", { method, headers: json, ...(readsBody ? { body: "[]" } : {}) }, "UNAUTHENTICATED"], ["a forged token", { method, headers: { authorization: "Bearer avt_e30.AAAA", ...json } }, "UNAUTHENTICATED"]);
      if (readsBody) {
        attempts.push(
          ["a form content type", { method, headers: { ...auth, "content-type": "text/plain" }, body: "[]" }, "UNSUPPORTED_MEDIA_TYPE"],
          ["malformed JSON", { method, headers: { ...auth, ...json }, body: "[{" }, "MALFORMED_REQUEST"],
        );
      }
      for (const [what, init, expected] of attempts) {
        const response = await fetch(url, init);
        assert.equal(response.headers.get("x-agentvm-error"), "1", `${method} ${path} with ${what}: not a typed error (${response.status})`);
        const { code } = ((await response.json()) as { error: { code: string } }).error;
        assert.equal(code, expected, `${method} ${path} with ${what}`);
        const listed = operation.responses[String(response.status)]?.content?.["application/json"]?.schema.properties?.error?.properties.code.enum ?? [];
        assert.ok(listed.includes(code), `${method} ${path} with ${what} answered ${response.status} ${code}, which the document does not list`);
        cases.push(`${method} ${path} ${what}`);
      }
    }
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 200, "the server still answers");
    assert.ok(cases.length > 4 * operations().length - 20, `${cases.length} cases`);
  });

  it("docs/http-api.md lists every action", () => {
    const httpApi = readFileSync(new URL("../docs/http-api.md", import.meta.url), "utf8");
    for (const action of VM_ACTIONS) assert.match(httpApi, new RegExp(`^\\| \`${action}\`|^\\| \`[a-zA-Z]+\` / \`${action}\``, "m"), `docs/http-api.md does not list ${action}`);
  });
});
