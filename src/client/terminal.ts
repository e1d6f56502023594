/**
 * handle.openTerminal(): a terminal on the VM over the server's WebSocket
 * route (docs/http-api.md#terminals). Uses the runtime's WebSocket (Node ≥ 22
 * and browsers have one; ClientOptions.WebSocket for others). The credential
 * travels as a subprotocol, because browsers cannot set headers on a
 * WebSocket.
 */
import { AgentVmError, invalidArgument } from "../errors.ts";
import type { OpenTerminalOptions, TerminalExit } from "../vm-terminal.ts";
import { AUTH_PROTOCOL_PREFIX, TERMINAL_PROTOCOL, type TerminalClientMessage } from "../wire.ts";

export type { OpenTerminalOptions, TerminalExit };

/** A terminal opened through the client. */
export interface ClientTerminal {
  /** The program's pid in the VM (listProcesses shows it with terminal: true). */
  readonly pid: number;
  readonly cols: number;
  readonly rows: number;
  /** Types into the terminal: text ("ls\r", "\x03" for Ctrl-C) or bytes. EPIPE once it has closed. */
  write(data: string | Uint8Array): void;
  /** A new window size (each 1 to 1000); a bad size is refused with INVALID_ARGUMENT. */
  resize(cols: number, rows: number): void;
  /** Signals the program (default SIGHUP). */
  kill(signal?: string): void;
  /** Output as it comes; the first listener also gets what came before it. Returns an unsubscribe function. */
  onData(listener: (data: Uint8Array) => void): () => void;
  /** Called once with the program's exit. Returns an unsubscribe function. */
  onExit(listener: (exit: TerminalExit) => void): () => void;
  /**
   * Resolves with the exit; rejects when the terminal ended otherwise: cut off
   * for not reading (EVENTS_TOO_SLOW), the VM destroyed, the connection lost (ECONNRESET).
   */
  readonly exited: Promise<TerminalExit>;
  /** Hangs up (SIGHUP; SIGKILL 2 s later if it is still there), waits for the exit (at most 10 s), then closes the connection. */
  close(): Promise<void>;
}

export interface TerminalConnection {
  /** ws:// or wss:// URL of the terminal route, with the options in its query. */
  url: string;
  token: string | undefined;
  WebSocket: typeof WebSocket | undefined;
  /** Asks the route over plain HTTP why the WebSocket was refused (the handshake's status is hidden from WebSocket users). */
  diagnose(): Promise<AgentVmError>;
}

const EARLY_OUTPUT_BYTES = 1 << 20;
/** How long close() waits for the program to exit on SIGHUP before closing the connection anyway. */
const CLOSE_GRACE_MS = 10_000;

/** The route's query for these options (validated on the server too). */
export function terminalQuery(options: OpenTerminalOptions): string {
  if (options === null || typeof options !== "object") throw invalidArgument(`openTerminal: options must be an object, got ${String(options)}`);
  const query = new URLSearchParams();
  for (const name of ["cols", "rows", "command", "cwd"] as const) if (options[name] !== undefined) query.set(name, String(options[name]));
  if (options.args !== undefined) {
    if (!Array.isArray(options.args)) throw invalidArgument("openTerminal: options.args must be an array of strings");
    for (const arg of options.args) query.append("arg", String(arg));
  }
  if (options.env !== undefined) query.set("env", JSON.stringify(options.env));
  const known = new Set(["cols", "rows", "command", "args", "cwd", "env"]);
  const unknown = Object.keys(options).find((key) => !known.has(key));
  if (unknown !== undefined) throw invalidArgument(`openTerminal: unknown option ${JSON.stringify(unknown)}; use command, args, cols, rows, cwd, env`);
  return query.size > 0 ? `?${query}` : "";
}

export function openTerminal(connection: TerminalConnection): Promise<ClientTerminal> {
  const Socket = connection.WebSocket ?? globalThis.WebSocket;
  if (typeof Socket !== "function") {
    return Promise.reject(new AgentVmError("INVALID_ARGUMENT", "openTerminal needs a WebSocket: this runtime has none; pass createClient({ WebSocket }) (e.g. from the ws package)"));
  }
  const protocols = [TERMINAL_PROTOCOL, ...(connection.token ? [`${AUTH_PROTOCOL_PREFIX}${base64url(connection.token)}`] : [])];
  const ws = new Socket(connection.url, protocols);
  ws.binaryType = "arraybuffer";
  const opened = Promise.withResolvers<ClientTerminal>();
  const exited = Promise.withResolvers<TerminalExit>();
  exited.promise.catch(() => {});
  const dataListeners = new Set<(data: Uint8Array) => void>();
  const exitListeners = new Set<(exit: TerminalExit) => void>();
  let early: Uint8Array[] | undefined = [];
  let earlyBytes = 0;
  let ready = false;
  let settled = false;
  let size = { cols: 0, rows: 0 };
  let pid = 0;

  const finish = (outcome: TerminalExit | AgentVmError) => {
    if (settled) return;
    settled = true;
    if (outcome instanceof AgentVmError) {
      if (!ready) opened.reject(outcome);
      exited.reject(outcome);
      return;
    }
    exited.resolve(outcome);
    for (const listener of exitListeners) listener(outcome);
  };
  const send = (data: string | Uint8Array) => {
    if (ws.readyState !== Socket.OPEN) throw new AgentVmError("EPIPE", `terminal ${pid}: the connection is closed`);
    ws.send(data);
  };

  const terminal: ClientTerminal = {
    get pid() {
      return pid;
    },
    get cols() {
      return size.cols;
    },
    get rows() {
      return size.rows;
    },
    write(data) {
      if (typeof data !== "string" && !(data instanceof Uint8Array)) throw invalidArgument(`terminal write: data must be a string or Uint8Array, got ${typeof data}`);
      send(typeof data === "string" ? new TextEncoder().encode(data) : data);
    },
    resize(cols, rows) {
      for (const [name, value] of [["cols", cols], ["rows", rows]] as const) {
        if (!Number.isInteger(value) || value < 1 || value > 1000) throw invalidArgument(`resize: ${name} must be an integer from 1 to 1000, got ${String(value)}`);
      }
      send(controlText({ type: "resize", cols, rows }));
      size = { cols, rows };
    },
    kill(signal) {
      if (signal !== undefined && (typeof signal !== "string" || !/^SIG[A-Z0-9]+$/.test(signal))) throw invalidArgument(`kill: signal must be a name like "SIGINT", got ${String(signal)}`);
      send(controlText(signal === undefined ? { type: "kill" } : { type: "kill", signal }));
    },
    onData(listener) {
      dataListeners.add(listener);
      if (early) {
        const pending = early;
        early = undefined;
        for (const data of pending) listener(data);
      }
      return () => dataListeners.delete(listener);
    },
    onExit(listener) {
      exitListeners.add(listener);
      return () => exitListeners.delete(listener);
    },
    exited: exited.promise,
    async close() {
      // Hang up and wait for the exit, so that when close() resolves the program is gone.
      if (ws.readyState === Socket.OPEN && !settled) {
        // The server hangs up (SIGHUP, SIGKILL after its grace) and then sends the exit.
        ws.send(controlText({ type: "close" }));
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([exited.promise.catch(() => {}), new Promise((resolve) => (timer = setTimeout(resolve, CLOSE_GRACE_MS)))]);
        clearTimeout(timer);
      }
      if (ws.readyState === Socket.OPEN || ws.readyState === Socket.CONNECTING) ws.close(1000, "closed by the client");
      await exited.promise.catch(() => {});
    },
  };

  ws.addEventListener("message", (event: MessageEvent) => {
    if (typeof event.data !== "string") {
      const data = new Uint8Array(event.data as ArrayBuffer);
      if (early) {
        if (earlyBytes + data.byteLength <= EARLY_OUTPUT_BYTES) early.push(data);
        earlyBytes += data.byteLength;
      } else for (const listener of dataListeners) listener(data);
      return;
    }
    let message: { type?: string; pid?: number; cols?: number; rows?: number; exitCode?: number; signal?: string | null; error?: unknown };
    try {
      message = JSON.parse(event.data) as typeof message;
    } catch {
      return;
    }
    if (message.type === "ready") {
      ready = true;
      pid = Number(message.pid);
      size = { cols: Number(message.cols), rows: Number(message.rows) };
      opened.resolve(terminal);
    } else if (message.type === "exit") {
      finish({ exitCode: Number(message.exitCode), signal: message.signal ?? null });
    } else if (message.type === "error") {
      const error = AgentVmError.from(message.error);
      // An error ends the terminal (the server closes the socket after it), except the answer to a
      // refused control message, which the client's own checks in resize() and kill() make rare.
      if (!ready || (error.code !== "INVALID_ARGUMENT" && error.code !== "MALFORMED_REQUEST")) finish(error);
    }
  });
  ws.addEventListener("close", () => {
    if (settled) return;
    if (!ready) {
      // The handshake was refused (the status is hidden from us) or the server went away: ask why over HTTP.
      void connection.diagnose().then(finish, (error: unknown) => finish(AgentVmError.from(error)));
      return;
    }
    finish(new AgentVmError("ECONNRESET", `terminal ${pid}: the connection closed before the program exited`));
  });
  return opened.promise;
}

function controlText(message: TerminalClientMessage): string {
  return JSON.stringify(message);
}

function base64url(text: string): string {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}
