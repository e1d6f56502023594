/**
 * `GET /api/:definition/:key/terminal` upgraded to a WebSocket: an interactive
 * terminal on the VM (Vm.openTerminal) for as long as the socket is open.
 *
 *   query      cols, rows (1..1000, default 80 × 24), command (default bash),
 *              arg (repeated, in order), cwd, env (a JSON object)
 *   binary     frames both ways: the terminal's output; keys typed into it
 *   text       JSON control messages. Client → server: {"type":"resize","cols":120,"rows":40},
 *              {"type":"kill","signal":"SIGINT"}, {"type":"close"} (hang up). Server → client: {"type":"ready","pid":9,"cols":80,"rows":24}
 *              first, {"type":"exit","exitCode":3,"signal":null} last (then close 1000), or
 *              {"type":"error","error":{"code","message"}} (then close 4000).
 *
 * Host, Origin and credentials are checked as for every API request, before
 * the upgrade: a refused request gets the usual JSON error response and never
 * a WebSocket (a page on a foreign origin cannot open one — cross-site
 * WebSocket hijacking). Browsers cannot set Authorization on a WebSocket, so
 * the credential may also come as the subprotocol `agentvm.auth.<base64url>`
 * beside `agentvm.terminal.v1`. Failures after that (a bad size, a program
 * not found, the VM's process cap) come as an error message on the socket.
 *
 * Closing the socket hangs the terminal up (SIGHUP, SIGKILL after a grace).
 * Output the client does not read is buffered up to TERMINAL_BUFFER_BYTES,
 * then the terminal is cut off with EVENTS_TOO_SLOW; input waiting for the VM
 * past MAX_PENDING_WRITES pauses reading from the socket.
 */
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { WebSocketServer, type RawData, type WebSocket } from "ws";
import { AgentVmError } from "../errors.ts";
import { AUTH_HEADER, AUTH_PROTOCOL_PREFIX, TERMINAL_ERROR_CLOSE, TERMINAL_PROTOCOL, type TerminalServerMessage } from "../wire.ts";
import type { VmTerminal } from "../vm-terminal.ts";
import { rawErrorResponse } from "./connection-guard.ts";
import { resolveRoute, type ApiContext } from "./http-api.ts";
import type { VmActor } from "./vm-actor.ts";

const TERMINAL_BUFFER_BYTES = 4 * 1024 * 1024;
/** Input sent to the VM and not yet taken by the terminal, before reading from the socket pauses. */
const MAX_PENDING_WRITES = 64;
const MAX_PENDING_INPUT_BYTES = 1024 * 1024;
/** Largest frame a client may send (keys and pastes; a terminal is no file transfer). */
const MAX_FRAME_BYTES = 1024 * 1024;
const HANGUP_GRACE_MS = 2_000;

const sockets = new WebSocketServer({
  noServer: true,
  maxPayload: MAX_FRAME_BYTES,
  perMessageDeflate: false,
  // The credential's subprotocol is never echoed back: the terminal one is chosen.
  handleProtocols: (protocols) => (protocols.has(TERMINAL_PROTOCOL) ? TERMINAL_PROTOCOL : false),
});

/** Whether `request` is for the terminal route (then this module answers it). */
export function isTerminalUpgrade(request: IncomingMessage): boolean {
  const path = (request.url ?? "").split("?")[0]!;
  return /^\/api\/[^/]+\/[^/]+\/terminal$/.test(path);
}

/** Checks the request like handleApi does, then upgrades it and runs the terminal. */
export function handleTerminalUpgrade(context: ApiContext, request: IncomingMessage, socket: Duplex, head: Buffer): void {
  socket.on("error", () => {}); // a client gone mid-handshake
  let actor: VmActor;
  try {
    if (request.method !== "GET") throw new AgentVmError("UNKNOWN_ACTION", "the terminal route is opened with GET and a WebSocket upgrade");
    context.origins.checkHost(request);
    context.origins.checkOrigin(request);
    const url = new URL(request.url ?? "/", "http://localhost");
    const credential = context.auth.authenticate(credentialOf(request));
    const route = resolveRoute(context, request, url);
    if (route.kind !== "vm" || route.route !== "terminal") throw new AgentVmError("UNKNOWN_ACTION", `no WebSocket route ${url.pathname}`);
    context.auth.authorize(credential, route.definition, route.key, route.action);
    context.placement?.(route.definition, route.key);
    const found = context.actor(route.definition, route.key);
    if (!found) throw new AgentVmError("UNKNOWN_ACTION", `no VM definition named ${JSON.stringify(route.definition)} in this registry`);
    actor = found;
  } catch (error) {
    const shaped = AgentVmError.from(error);
    socket.end(rawErrorResponse(shaped.code, shaped.message));
    return;
  }
  // Held through the handshake: a handshake ws refuses (it answers 400 and never calls back)
  // must still let the actor go idle, as every other route does.
  const release = actor.hold();
  socket.once("close", release);
  sockets.handleUpgrade(request, socket, head, (ws) => {
    socket.off("close", release);
    // runTerminal takes its own hold before anything else.
    void runTerminal(actor, new URL(request.url ?? "/", "http://localhost").searchParams, ws);
    release();
  });
}

/** As on every route, x-agentvm-authorization before Authorization; then the subprotocol form browsers can send. */
function credentialOf(request: IncomingMessage): string | undefined {
  const header = request.headers[AUTH_HEADER] ?? request.headers.authorization;
  if (typeof header === "string") return header;
  const offered = String(request.headers["sec-websocket-protocol"] ?? "").split(",").map((protocol) => protocol.trim());
  const encoded = offered.find((protocol) => protocol.startsWith(AUTH_PROTOCOL_PREFIX));
  return encoded === undefined ? undefined : `Bearer ${Buffer.from(encoded.slice(AUTH_PROTOCOL_PREFIX.length), "base64url").toString("utf8")}`;
}

function terminalOptions(query: URLSearchParams): Record<string, unknown> {
  const number = (name: string) => {
    const text = query.get(name);
    return text === null ? undefined : /^\d{1,7}$/.test(text) ? Number(text) : text;
  };
  let env: unknown;
  const envText = query.get("env");
  if (envText !== null) {
    try {
      env = JSON.parse(envText);
    } catch {
      throw new AgentVmError("INVALID_ARGUMENT", "terminal: env must be a JSON object of strings, e.g. env={\"LANG\":\"C.UTF-8\"}");
    }
  }
  const options: Record<string, unknown> = { cols: number("cols"), rows: number("rows"), command: query.get("command") ?? undefined, cwd: query.get("cwd") ?? undefined, env };
  if (query.has("arg")) options.args = query.getAll("arg");
  for (const key of Object.keys(options)) if (options[key] === undefined) delete options[key];
  return options;
}

async function runTerminal(actor: VmActor, query: URLSearchParams, ws: WebSocket): Promise<void> {
  const release = actor.hold();
  let terminal: VmTerminal | undefined;
  let closed = false;
  const control = (message: TerminalServerMessage) => {
    if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(message));
  };
  const fail = (error: unknown) => {
    control({ type: "error", error: AgentVmError.from(error).toJSON() });
    // Reading again, so the client's close frame (or its going away) is seen and the socket ends now.
    ws.resume();
    ws.close(TERMINAL_ERROR_CLOSE, AgentVmError.from(error).code);
    void terminal?.close(HANGUP_GRACE_MS);
  };
  ws.on("close", () => {
    closed = true;
    release();
    void terminal?.close(HANGUP_GRACE_MS);
  });
  ws.on("error", () => ws.terminate());
  // Input that comes before the terminal is open waits for it (bounded by the pending-writes pause below).
  const pending = { writes: 0, bytes: 0 };
  const write = (data: Buffer) => {
    pending.writes++;
    pending.bytes += data.byteLength;
    if (pending.writes >= MAX_PENDING_WRITES || pending.bytes >= MAX_PENDING_INPUT_BYTES) ws.pause();
    terminal!
      .write(data)
      .catch(() => {}) // exited: the exit message is on its way
      .finally(() => {
        pending.writes--;
        pending.bytes -= data.byteLength;
        if (pending.writes < MAX_PENDING_WRITES / 2 && pending.bytes < MAX_PENDING_INPUT_BYTES / 2) ws.resume();
      });
  };
  const onMessage = (data: RawData, isBinary: boolean) => {
    if (!terminal) return;
    const bytes = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
    if (isBinary) return write(bytes);
    // A bad control message is answered, not fatal: the terminal stays open.
    handleControl(terminal, bytes.toString("utf8")).catch((error: unknown) => control({ type: "error", error: AgentVmError.from(error).toJSON() }));
  };
  // Frames are held (paused) until the terminal exists, so none is lost or reordered.
  ws.pause();
  ws.on("message", onMessage);
  try {
    const options = terminalOptions(query);
    const opened = await actor.use((vm) => vm.openTerminal(options));
    terminal = opened;
    if (closed) return void opened.close(HANGUP_GRACE_MS);
  } catch (error) {
    return fail(error);
  }
  const open = terminal;
  control({ type: "ready", pid: open.pid, cols: open.cols, rows: open.rows });
  open.onData((data) => {
    if (ws.readyState !== ws.OPEN) return;
    if (ws.bufferedAmount > TERMINAL_BUFFER_BYTES) {
      return fail(new AgentVmError("EVENTS_TOO_SLOW", `the terminal's output fell more than ${TERMINAL_BUFFER_BYTES} bytes behind its reader; it was hung up — read output as it comes`));
    }
    ws.send(data, { binary: true });
  });
  open.onExit((exit) => {
    control({ type: "exit", exitCode: exit.exitCode, signal: exit.signal });
    if (ws.readyState === ws.OPEN) ws.close(1000, "exited");
  });
  ws.resume();
}

async function handleControl(terminal: VmTerminal, text: string): Promise<void> {
  let message: { type?: unknown; cols?: unknown; rows?: unknown; signal?: unknown };
  try {
    message = JSON.parse(text) as typeof message;
  } catch {
    throw new AgentVmError("MALFORMED_REQUEST", "terminal: text frames must be JSON control messages ({\"type\":\"resize\",\"cols\":…,\"rows\":…} or {\"type\":\"kill\",\"signal\":…}); send keys as binary frames");
  }
  if (message?.type === "resize") return terminal.resize(message.cols as number, message.rows as number);
  if (message?.type === "kill") return terminal.kill(message.signal === undefined ? undefined : (message.signal as string));
  if (message?.type === "close") {
    await terminal.close(HANGUP_GRACE_MS);
    return;
  }
  throw new AgentVmError("MALFORMED_REQUEST", `terminal: unknown control message type ${JSON.stringify(message?.type)}; use "resize", "kill" or "close"`);
}
