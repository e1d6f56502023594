/**
 * The OpenAPI 3.1 document of the HTTP API (served at GET /openapi.json), built
 * from the same tables the server dispatches on: every name in VM_ACTIONS gets
 * its action route, and every error status comes from httpStatus(), so neither
 * can drift from the server. ACTION_SCHEMAS adds argument and result shapes; an
 * action without an entry still appears, with a generic argument list.
 * test/server-openapi.test.ts checks the document against the running server,
 * docs/errors.md and docs/http-api.md.
 */
import { VM_ACTIONS, type VmActionName } from "../actions.ts";
import { AGENTVM_CODES, POSIX_CODES, type ErrorCode } from "../errors.ts";
import { httpStatus } from "./http-api.ts";

type Schema = Record<string, unknown>;

const str: Schema = { type: "string" };
const int: Schema = { type: "integer" };
const bool: Schema = { type: "boolean" };
const nil: Schema = { type: "null" };
const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
const obj = (properties: Record<string, Schema>, required: string[] = []): Schema => ({ type: "object", properties, required, additionalProperties: false });
const arrayOf = (items: Schema): Schema => ({ type: "array", items });
const path = { name: "path", schema: { ...str, description: "A VM path: absolute, or relative to /home/agentos" } };
const pid = { name: "pid", schema: int };
const recursive = { name: "options", schema: obj({ recursive: bool }), optional: true };
const spawnOptions = { cwd: str, env: { type: "object", additionalProperties: str } };

interface ActionSchema {
  summary: string;
  args: { name: string; schema: Schema; optional?: boolean }[];
  result: Schema;
}

/** Argument and result shapes of the actions (see docs/http-api.md for their meaning). */
export const ACTION_SCHEMAS: Partial<Record<VmActionName, ActionSchema>> = {
  writeFile: { summary: "Write a file (atomically), creating parent directories", args: [path, { name: "content", schema: { oneOf: [str, ref("Bytes")] } }], result: nil },
  readFile: { summary: "Read a file", args: [path], result: ref("Bytes") },
  mkdir: { summary: "Create a directory", args: [path, recursive], result: nil },
  readdir: { summary: "List a directory, sorted", args: [path], result: arrayOf(str) },
  stat: {
    summary: "Stat a path",
    args: [path],
    result: obj({ type: str, size: int, mode: int, mtimeMs: { type: "number" }, ctimeMs: { type: "number" }, isFile: bool, isDirectory: bool, isSymbolicLink: bool }),
  },
  exists: { summary: "Whether a path exists", args: [path], result: bool },
  deleteFile: { summary: "Delete a file or directory", args: [path, recursive], result: nil },
  remove: { summary: "Alias of deleteFile", args: [path, recursive], result: nil },
  move: { summary: "Move or rename", args: [{ name: "from", schema: str }, { name: "to", schema: str }], result: nil },
  spawn: {
    summary: "Start a program",
    args: [{ name: "command", schema: str }, { name: "args", schema: arrayOf(str), optional: true }, { name: "options", schema: obj({ ...spawnOptions, restartOnWake: bool }), optional: true }],
    result: obj({ pid: int }, ["pid"]),
  },
  exec: {
    summary: "Run a program to completion (bounded by timeoutMs and maxOutputBytes)",
    args: [{ name: "command", schema: str }, { name: "args", schema: arrayOf(str), optional: true }, { name: "options", schema: obj({ ...spawnOptions, timeoutMs: int, maxOutputBytes: int }), optional: true }],
    result: obj({ pid: int, exitCode: int, stdout: str, stderr: str }),
  },
  waitProcess: { summary: "Wait for a process to exit; its exit code", args: [pid], result: int },
  killProcess: { summary: "Signal a process (default SIGTERM)", args: [pid, { name: "signal", schema: { oneOf: [str, int] }, optional: true }], result: nil },
  listProcesses: { summary: "Processes in the VM", args: [], result: arrayOf({ type: "object" }) },
  getProcessLogs: {
    summary: "A process's recent output",
    args: [pid, { name: "options", schema: obj({ since: int, tail: int }), optional: true }],
    result: obj({ pid: int, dropped: bool, output: arrayOf(obj({ seq: int, stream: { enum: ["stdout", "stderr"] }, data: ref("Bytes") })) }),
  },
  writeProcessStdin: { summary: "Write to a process's stdin", args: [pid, { name: "data", schema: { oneOf: [str, ref("Bytes")] } }], result: nil },
  closeProcessStdin: { summary: "Close a process's stdin", args: [pid], result: nil },
  listeningPorts: { summary: "Ports guests listen on", args: [], result: arrayOf(int) },
  usage: { summary: "Resources the VM uses against its limits", args: [], result: { type: "object" } },
  setLifecycle: {
    summary: "Set this VM's own lifetime and idle timeout (null: the definition's); a token must list it",
    args: [{ name: "options", schema: obj({ maxLifetimeSeconds: { oneOf: [{ type: "number" }, nil] }, idleTimeoutSeconds: { oneOf: [{ type: "number" }, nil] } }) }],
    result: obj({ maxLifetimeSeconds: { oneOf: [{ type: "number" }, nil] }, idleTimeoutSeconds: { oneOf: [{ type: "number" }, nil] }, expiresAt: { oneOf: [int, nil] } }),
  },
  createSignedPreviewUrl: {
    summary: "Mint a preview URL for a port",
    args: [{ name: "port", schema: int }, { name: "ttlSeconds", schema: { type: "number" }, optional: true }],
    result: obj({ url: str, path: str, token: str, port: int, expiresAt: int }, ["path", "token", "port", "expiresAt"]),
  },
  expireSignedPreviewUrl: { summary: "Revoke a preview URL", args: [{ name: "token", schema: str }], result: bool },
  listPreviewUrls: { summary: "The VM's active preview URLs", args: [], result: arrayOf(obj({ tokenPrefix: str, port: int, createdAt: int, expiresAt: int, lastUsedAt: { oneOf: [int, nil] } })) },
  expireAllPreviewUrls: { summary: "Revoke all (or one port's) preview URLs; how many", args: [{ name: "port", schema: int, optional: true }], result: int },
};

/** Errors any API route can answer (checks that run before the route's own work). */
const COMMON_ERRORS: ErrorCode[] = ["UNAUTHENTICATED", "FORBIDDEN", "HOST_NOT_ALLOWED", "ORIGIN_NOT_ALLOWED", "UNKNOWN_ACTION", "MALFORMED_REQUEST", "HEADERS_TOO_LARGE", "TOO_MANY_CONNECTIONS", "SERVER_CLOSING", "INTERNAL"];
/** What the public routes (no credentials) can answer: the checks below the route. */
const PUBLIC_ERRORS: ErrorCode[] = ["HOST_NOT_ALLOWED", "ORIGIN_NOT_ALLOWED", "MALFORMED_REQUEST", "HEADERS_TOO_LARGE", "TOO_MANY_CONNECTIONS", "INTERNAL"];
/** …plus these on routes that read a body. */
const BODY_ERRORS: ErrorCode[] = ["UNSUPPORTED_MEDIA_TYPE", "PAYLOAD_TOO_LARGE"];
/** …plus these where a VM is woken. */
const VM_ERRORS: ErrorCode[] = ["INVALID_ARGUMENT", "TOO_MANY_VMS", "VM_DESTROY_FAILED", "SANDBOX_UNAVAILABLE", "IMAGE_BUILD_FAILED", "GUEST_RUNTIME_MISSING"];
/**
 * An action may fail with any code a VM operation has (POSIX and agentvm ones), except those
 * never answered as an HTTP status: raised by the client or start(), or sent inside an event stream.
 */
const CLIENT_ONLY: ReadonlySet<ErrorCode> = new Set(["SERVER_UNREACHABLE", "AUTH_NOT_CONFIGURED", "EVENTS_TOO_SLOW", "CLUSTER_UNAVAILABLE"]);
const ACTION_ERRORS: ErrorCode[] = [...POSIX_CODES, ...AGENTVM_CODES].filter((code) => !CLIENT_ONLY.has(code));

/** Error responses grouped by the status the server answers each code with. */
function errorResponses(codes: readonly ErrorCode[]): Record<string, unknown> {
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of new Set(codes)) {
    const status = httpStatus(code);
    byStatus.set(status, [...(byStatus.get(status) ?? []), code]);
  }
  return Object.fromEntries(
    [...byStatus.entries()]
      .sort(([a], [b]) => a - b)
      .map(([status, list]) => [
        String(status),
        {
          description: `Error: ${list.join(", ")} (docs/errors.md)`,
          headers: { "x-agentvm-error": { schema: { const: "1" } } },
          content: { "application/json": { schema: errorSchema(list) } },
        },
      ]),
  );
}

function errorSchema(codes: readonly ErrorCode[]): Schema {
  return obj({ error: obj({ code: { enum: [...codes] }, message: str, details: { type: "object" } }, ["code", "message"]) }, ["error"]);
}

const json = (schema: Schema, description = "OK") => ({ description, content: { "application/json": { schema } } });
const valueOf = (schema: Schema): Schema => obj({ value: schema }, ["value"]);
const definitionParam = (definitions: readonly string[]) => ({ name: "definition", in: "path", required: true, schema: { enum: [...definitions] }, description: "A definition name under setup({ use })" });
const keyParam = { name: "key", in: "path", required: true, schema: { type: "string", minLength: 1, maxLength: 256 }, description: "The VM key, percent-encoded" };

function actionOperation(action: VmActionName, definitions: readonly string[]): Record<string, unknown> {
  const schema = ACTION_SCHEMAS[action];
  const args = schema?.args ?? [];
  const argsSchema: Schema = schema
    ? { type: "array", prefixItems: args.map((arg) => ({ ...arg.schema, title: arg.name })), minItems: args.filter((arg) => !arg.optional).length, maxItems: args.length }
    : { type: "array", maxItems: 8 };
  return {
    post: {
      operationId: action,
      summary: schema?.summary ?? action,
      tags: ["actions"],
      parameters: [definitionParam(definitions), keyParam],
      requestBody: {
        required: false,
        content: {
          "application/json": { schema: { oneOf: [argsSchema, obj({ value: argsSchema }, ["value"])] } },
          "application/vnd.agentvm.envelope": { schema: { type: "string", format: "binary" } },
        },
      },
      responses: { "200": json(valueOf(schema?.result ?? {})), ...errorResponses([...COMMON_ERRORS, ...BODY_ERRORS, ...VM_ERRORS, ...ACTION_ERRORS]) },
    },
  };
}

/** The streamed file routes (file-transfer-route.ts): bodies are raw bytes, never JSON. */
function transferPaths(vmParams: unknown[]): Record<string, unknown> {
  const guestPath = { name: "path", in: "path", required: true, schema: str, description: "A VM path (may contain slashes), relative to /" };
  const errors = errorResponses([...COMMON_ERRORS, ...VM_ERRORS, ...ACTION_ERRORS]);
  const bytes = (type: string, description: string) => ({ description, content: { [type]: { schema: { type: "string", format: "binary" } } } });
  const uploaded = json(valueOf({ type: "object" }));
  return {
    "/api/{definition}/{key}/files/{path}": {
      parameters: [...vmParams, guestPath],
      get: { operationId: "downloadFile", summary: "Download a file, streamed (Range: bytes=… answered with 206)", tags: ["files"], responses: { "200": bytes("application/octet-stream", "The file's bytes"), "206": bytes("application/octet-stream", "The requested range"), ...errors } },
      head: { operationId: "statFile", summary: "A file's size and headers without its bytes", tags: ["files"], responses: { "200": { description: "Headers only" }, ...errors } },
      put: {
        operationId: "uploadFile",
        summary: "Upload a file, streamed; it appears under its name once the body ended (?mode=644, ?append=1)",
        tags: ["files"],
        parameters: [{ name: "mode", in: "query", schema: str }, { name: "append", in: "query", schema: str }],
        requestBody: { required: true, content: { "application/octet-stream": { schema: { type: "string", format: "binary" } } } },
        responses: { "200": uploaded, ...errors },
      },
    },
    "/api/{definition}/{key}/tar/{path}": {
      parameters: [...vmParams, guestPath],
      get: { operationId: "downloadTar", summary: "A directory as a tar stream", tags: ["files"], responses: { "200": bytes("application/x-tar", "A tar archive"), ...errors } },
      put: {
        operationId: "uploadTar",
        summary: "Extract a tar stream into a directory",
        tags: ["files"],
        requestBody: { required: true, content: { "application/x-tar": { schema: { type: "string", format: "binary" } } } },
        responses: { "200": uploaded, ...errors },
      },
    },
    "/api/{definition}/{key}/watch/{path}": {
      parameters: [...vmParams, guestPath],
      get: {
        operationId: "watch",
        summary: "Changes under a path as Server-Sent Events (?recursive=1)",
        tags: ["files"],
        parameters: [{ name: "recursive", in: "query", schema: str }],
        responses: { "200": { description: "An event stream", content: { "text/event-stream": { schema: str } } }, ...errors },
      },
    },
  };
}

/** The document for a registry with these definition names. */
export function buildOpenApi(definitions: readonly string[]): Record<string, unknown> {
  const vmParams = [definitionParam(definitions), keyParam];
  const paths: Record<string, unknown> = {
    "/health": { get: { operationId: "health", summary: "Liveness probe (no credentials)", tags: ["server"], security: [], responses: { "200": json(obj({ ok: { const: true } })), ...errorResponses(PUBLIC_ERRORS) } } },
    "/openapi.json": { get: { operationId: "openapi", summary: "This document (no credentials)", tags: ["server"], security: [], responses: { "200": json({ type: "object" }), ...errorResponses(PUBLIC_ERRORS) } } },
    "/api/tokens": {
      post: {
        operationId: "createToken",
        summary: "Mint a scoped token (API key only)",
        tags: ["auth"],
        requestBody: { required: true, content: { "application/json": { schema: obj({ definition: str, key: { oneOf: [str, arrayOf(str)] }, actions: { oneOf: [{ const: "*" }, arrayOf(str)] }, expiresInSeconds: { type: "number" } }, ["key"]) } } },
        responses: { "200": json(valueOf(obj({ token: str, definition: str, key: str, actions: {}, expiresAt: int }))), ...errorResponses([...COMMON_ERRORS, ...BODY_ERRORS, "INVALID_ARGUMENT"]) },
      },
    },
    "/api/tokens/{id}": {
      delete: {
        operationId: "revokeToken",
        summary: "Revoke a scoped token at once (API key only); the path holds its id (or the token itself)",
        tags: ["auth"],
        parameters: [{ name: "id", in: "path", required: true, schema: str }],
        responses: { "200": json(valueOf(obj({ revoked: bool }, ["revoked"]))), ...errorResponses([...COMMON_ERRORS, "INVALID_ARGUMENT"]) },
      },
    },
    "/api/definitions": {
      get: {
        operationId: "listDefinitions",
        summary: "The registry's VM definition names (API key only)",
        tags: ["vms"],
        responses: { "200": json(valueOf(arrayOf(str))), ...errorResponses(COMMON_ERRORS) },
      },
    },
    "/api/{definition}/vms": {
      get: {
        operationId: "listVms",
        summary: "List a definition's VMs in key order (API key only)",
        tags: ["vms"],
        parameters: [definitionParam(definitions), { name: "after", in: "query", schema: str }, { name: "limit", in: "query", schema: { type: "integer", minimum: 1, maximum: 1000 } }],
        responses: {
          "200": json(valueOf(arrayOf(obj({ key: str, awake: bool, createdAt: int, lastActiveAt: int, wakeCount: int, diskBytes: { oneOf: [int, nil] }, destroying: { const: true } }, ["key", "awake", "createdAt", "lastActiveAt", "wakeCount", "diskBytes"])))),
          ...errorResponses([...COMMON_ERRORS, "INVALID_ARGUMENT"]),
        },
      },
    },
    "/api/{definition}/{key}": {
      delete: {
        operationId: "destroyVm",
        summary: "Destroy a VM for good: processes, files, preview URLs, rows",
        tags: ["vms"],
        parameters: [...vmParams, { name: "confirm", in: "query", required: true, schema: str, description: "The VM key again" }],
        responses: { "200": json(valueOf(obj({ key: str, existed: bool }))), ...errorResponses([...COMMON_ERRORS, "INVALID_ARGUMENT", "DESTROY_NOT_CONFIRMED", "VM_DESTROY_FAILED"]) },
      },
    },
    "/api/{definition}/{key}/status": {
      get: {
        operationId: "status",
        summary: "Awake or asleep, read without waking the VM",
        tags: ["vms"],
        parameters: vmParams,
        responses: { "200": json(valueOf(obj({ awake: bool, runningProcesses: int, createdAt: { oneOf: [int, nil] }, lastActiveAt: { oneOf: [int, nil] }, wakeCount: int }))), ...errorResponses([...COMMON_ERRORS, "INVALID_ARGUMENT"]) },
      },
    },
    "/api/{definition}/{key}/events": {
      get: {
        operationId: "connect",
        summary: "processOutput and processExit as Server-Sent Events; ?since= replays the logs first",
        tags: ["events"],
        parameters: [...vmParams, { name: "since", in: "query", schema: { type: "integer", minimum: 0 } }],
        responses: { "200": { description: "An event stream (see docs/http-api.md#events)", content: { "text/event-stream": { schema: str } } }, ...errorResponses([...COMMON_ERRORS, ...VM_ERRORS]) },
      },
    },
    "/api/{definition}/{key}/terminal": {
      get: {
        operationId: "openTerminal",
        summary: "A terminal (a program on a pseudo-terminal in the VM) over a WebSocket: binary frames both ways, JSON control messages as text (docs/http-api.md#terminals)",
        tags: ["terminals"],
        parameters: [
          ...vmParams,
          { name: "cols", in: "query", schema: { type: "integer", minimum: 1, maximum: 1000 } },
          { name: "rows", in: "query", schema: { type: "integer", minimum: 1, maximum: 1000 } },
          { name: "command", in: "query", schema: str, description: "Default bash" },
          { name: "arg", in: "query", schema: arrayOf(str), style: "form", explode: true, description: "One per argument, in order" },
          { name: "cwd", in: "query", schema: str },
          { name: "env", in: "query", schema: str, description: "A JSON object of strings" },
        ],
        responses: {
          "101": { description: "Switched to a WebSocket (subprotocol agentvm.terminal.v1); later failures (INVALID_ARGUMENT, ENOENT, EAGAIN, EVENTS_TOO_SLOW) come as an error message, then close code 4000" },
          ...errorResponses([...COMMON_ERRORS, "UPGRADE_REQUIRED"]),
        },
      },
    },
    "/api/{definition}/{key}/fetch/{port}/{path}": {
      parameters: [...vmParams, { name: "port", in: "path", required: true, schema: { type: "integer", minimum: 1, maximum: 65535 } }, { name: "path", in: "path", required: true, schema: str, description: "The guest's path (may contain slashes) and query" }],
      ...Object.fromEntries(
        ["get", "post", "put", "patch", "delete", "head", "options"].map((method) => [
          method,
          {
            operationId: `vmFetch_${method}`,
            summary: "vmFetch: an HTTP request to a port in the VM, streamed both ways; the guest's own response comes back as it is",
            tags: ["fetch"],
            responses: {
              default: { description: "The guest's response (without x-agentvm-error), or one of the errors below" },
              ...errorResponses([...COMMON_ERRORS, ...VM_ERRORS, "UNSUPPORTED_MEDIA_TYPE", "ECONNREFUSED", "ECONNRESET", "FETCH_FAILED", "ETIMEDOUT", "EACCES"]),
            },
          },
        ]),
      ),
    },
  };
  Object.assign(paths, transferPaths(vmParams));
  for (const action of VM_ACTIONS) paths[`/api/{definition}/{key}/actions/${action}`] = actionOperation(action, definitions);
  return {
    openapi: "3.1.0",
    info: { title: "agentvm", version: "1", description: "A VM per AI agent. See docs/http-api.md; every error is { error: { code, message } } with x-agentvm-error: 1 (docs/errors.md)." },
    security: [{ bearer: [] }],
    paths,
    components: {
      securitySchemes: { bearer: { type: "http", scheme: "bearer", description: "An API key or a scoped token (avt_…); not needed on an open (loopback, keyless) server" } },
      schemas: { Bytes: obj({ $base64: str }, ["$base64"]) },
    },
  };
}
