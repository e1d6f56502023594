/**
 * The server's end of a VM's control channel (Node IPC to init, see
 * init/protocol.ts). Requests get ids and exactly one reply; connected sockets
 * arrive as handles beside replies.
 *
 * init runs inside the VM, so everything it says is untrusted: each message is
 * checked against the protocol before anything acts on it, and a message that
 * breaks it ends this VM's sandbox (never the server) through `onViolation`.
 */
import type { ChildProcess } from "node:child_process";
import { Socket } from "node:net";
import { AgentVmError } from "../errors.ts";
import { MAX_DATA_CHARS, MAX_MESSAGE_BYTES, MAX_WATCH_BATCH, WATCH_EVENT_TYPES, type FromInit, type ToInit } from "../init/protocol.ts";
import { guardIpcReader } from "./ipc-reader-guard.ts";

type Reply = Extract<FromInit, { t: "reply" }>;
type Request = ToInit extends infer M ? (M extends { id: number } ? Omit<M, "id"> : never) : never;

export interface ChannelEvents {
  /** A message that is not a reply (output, exit, egress, resolve, ready), already validated. */
  onEvent(message: Exclude<FromInit, Reply>): void;
  /** init broke the protocol ("sent …", "stopped reading …"); the caller ends the sandbox. */
  onViolation(reason: string): void;
}

/** Requests that may wait at once; more is a server bug or a stuck VM, not normal load. */
const MAX_PENDING = 4096;
/**
 * Bytes sent to init that it has not read yet (Node buffers them in the
 * server until the pipe takes them). An init that stops reading is cut off
 * here rather than growing the server's memory.
 */
export const MAX_UNREAD_BYTES = 64 * 1024 * 1024;
/**
 * How long init may take over requests that depend on init alone. A guest runs
 * as init's uid and can stop it (SIGSTOP); past this the VM's init is taken as
 * stuck and the sandbox is ended, rather than leaving callers waiting forever.
 * Requests whose answer waits on guest programs (stdin a program does not
 * read, a connect to a guest's full backlog) are not timed here.
 */
export const REPLY_DEADLINE_MS = 30_000;
const TIMED_REQUESTS: ReadonlySet<string> = new Set(["spawn", "ps", "ports", "watch"]);
/** What a message without bulk data counts for; bulk data (stdin) counts by its length. */
const MESSAGE_OVERHEAD = 256;
let warnedUnguarded = false;

export class ControlChannel {
  readonly #child: ChildProcess;
  readonly #events: ChannelEvents;
  readonly #pending = new Map<number, { resolve(value: { reply: Reply; handle: Socket | undefined }): void; reject(error: Error): void }>();
  #nextId = 1;
  #closedError: AgentVmError | undefined;
  #unreadBytes = 0;

  constructor(child: ChildProcess, events: ChannelEvents) {
    this.#child = child;
    this.#events = events;
    // Node's IPC reader alone would buffer one endless line whole, and throw out of the event loop
    // (ending the server) on a line that is not JSON: both become this VM's violation instead.
    const guarded = guardIpcReader(child, MAX_MESSAGE_BYTES, (reason) => {
      // Reported outside Node's read callback, which is still on the stack.
      process.nextTick(() => this.#events.onViolation(`sent ${reason}`));
    });
    if (!guarded && !warnedUnguarded) {
      warnedUnguarded = true;
      console.warn(`agentvm: this Node's IPC reader is not the one agentvm knows (${process.version}); messages from VMs' init are not size-capped`);
    }
    child.on("message", (message: unknown, handle: unknown) => this.#receive(message, handle));
    child.on("disconnect", () => this.close(new AgentVmError("SANDBOX_EXITED", "the VM's init closed its control channel")));
  }

  get closed(): boolean {
    return this.#closedError !== undefined;
  }

  /** Sends a request and resolves with init's reply; a failed reply rejects with its code. */
  request(message: Request, handle?: Socket): Promise<{ reply: Reply & { ok: true }; handle: Socket | undefined }> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    if (this.#pending.size >= MAX_PENDING) return Promise.reject(new AgentVmError("LIMIT_EXCEEDED", `too many requests waiting for the VM's init (${MAX_PENDING})`));
    const id = this.#nextId++;
    const { promise, resolve, reject } = Promise.withResolvers<{ reply: Reply; handle: Socket | undefined }>();
    this.#pending.set(id, { resolve, reject });
    this.#send({ ...message, id } as ToInit, handle);
    if (TIMED_REQUESTS.has(message.t)) {
      const deadline = setTimeout(() => {
        // Still waiting: the violation ends the sandbox, and closing the channel rejects this request.
        if (this.#pending.has(id)) this.#events.onViolation(`did not answer a ${message.t} request within ${REPLY_DEADLINE_MS / 1000} s (stopped or stuck)`);
      }, REPLY_DEADLINE_MS);
      deadline.unref();
      void promise.finally(() => clearTimeout(deadline)).catch(() => {});
    }
    return promise.then(({ reply, handle: received }) => {
      if (!reply.ok) {
        received?.destroy();
        throw new AgentVmError(reply.code as never, reply.message);
      }
      return { reply, handle: received };
    });
  }

  /** Sends a message that has no reply. */
  notify(message: ToInit, handle?: Socket): void {
    if (this.#closedError) handle?.destroy(); // an egress connection opened for a VM that has ended
    else this.#send(message, handle);
  }

  close(error: AgentVmError): void {
    if (this.#closedError) return;
    this.#closedError = error;
    for (const waiter of this.#pending.values()) waiter.reject(error);
    this.#pending.clear();
    if (this.#child.connected) this.#child.disconnect();
  }

  #send(message: ToInit, handle?: Socket): void {
    if (!this.#child.connected) {
      handle?.destroy();
      return;
    }
    const bytes = MESSAGE_OVERHEAD + ("data" in message && typeof message.data === "string" ? message.data.length : 0);
    if (this.#unreadBytes + bytes > MAX_UNREAD_BYTES) {
      handle?.destroy();
      this.#events.onViolation(`stopped reading its control channel (${MAX_UNREAD_BYTES} bytes waiting for it)`);
      return;
    }
    this.#unreadBytes += bytes;
    // The callback runs once the message is written to the pipe: then init's kernel buffer holds it, not the server.
    this.#child.send(message, handle, { keepOpen: false }, (error) => {
      this.#unreadBytes -= bytes;
      if (error) this.close(new AgentVmError("SANDBOX_EXITED", `the VM's control channel failed: ${error.message}`));
    });
  }

  #receive(message: unknown, handle: unknown): void {
    const socket = handle instanceof Socket ? handle : undefined;
    const problem = checkMessage(message);
    if (problem !== undefined) {
      socket?.destroy();
      this.#events.onViolation(`sent ${problem}`);
      return;
    }
    const valid = message as FromInit;
    if (valid.t !== "reply") {
      socket?.destroy();
      this.#events.onEvent(valid);
      return;
    }
    const waiter = this.#pending.get(valid.id);
    if (!waiter) {
      socket?.destroy();
      this.#events.onViolation(`sent a reply to request ${valid.id}, which is not waiting`);
      return;
    }
    this.#pending.delete(valid.id);
    waiter.resolve({ reply: valid, handle: socket });
  }
}

/** More than a VM could run: pid_max is 4 million, but no VM gets near this many. */
const MAX_PROCESSES = 65536;

function isVmProcess(value: unknown): boolean {
  if (typeof value !== "object" || value === null) return false;
  const p = value as Record<string, unknown>;
  return (
    isInt(p.pid, 1, 2 ** 22) &&
    isInt(p.ppid, 0, 2 ** 22) &&
    Array.isArray(p.argv) &&
    p.argv.length <= 256 &&
    p.argv.every((arg) => isText(arg)) &&
    isText(p.cwd) &&
    Number.isFinite(p.startedAt)
  );
}

const WATCH_TYPES: ReadonlySet<unknown> = new Set(WATCH_EVENT_TYPES);

function isWatchEvent(value: unknown): boolean {
  if (typeof value !== "object" || value === null) return false;
  const e = value as Record<string, unknown>;
  return WATCH_TYPES.has(e.type) && isText(e.path) && e.path.startsWith("/") && (e.oldPath === undefined || (isText(e.oldPath) && e.oldPath.startsWith("/")));
}

const isInt = (value: unknown, min = 0, max = 2 ** 31 - 1): value is number => Number.isInteger(value) && (value as number) >= min && (value as number) <= max;
const isText = (value: unknown, max = 4096): value is string => typeof value === "string" && value.length <= max;

/** Returns what is wrong with a message from init, or undefined when it follows the protocol. */
function checkMessage(message: unknown): string | undefined {
  if (typeof message !== "object" || message === null || Array.isArray(message)) return "a message that is not an object";
  const m = message as Record<string, unknown>;
  switch (m.t) {
    case "ready":
      return isInt(m.pid, 1) ? undefined : "a malformed ready message";
    case "reply":
      if (!isInt(m.id, 1)) return "a reply without a valid id";
      if (m.ok === true) {
        if (m.pid !== undefined && !isInt(m.pid, 1)) return "a reply with a malformed pid";
        if (m.ports !== undefined && !(Array.isArray(m.ports) && m.ports.length <= 65536 && m.ports.every((port) => isInt(port, 1, 65535)))) return "a reply with malformed ports";
        if (m.processes !== undefined && !(Array.isArray(m.processes) && m.processes.length <= MAX_PROCESSES && m.processes.every(isVmProcess))) return "a reply with malformed processes";
        return undefined;
      }
      return m.ok === false && isText(m.code, 64) && isText(m.message) ? undefined : "a malformed failure reply";
    case "output":
      return isInt(m.pid, 1) && (m.fd === 1 || m.fd === 2) && isText(m.data, MAX_DATA_CHARS) ? undefined : "a malformed output message";
    case "exit":
      return isInt(m.pid, 1) && (m.code === null || isInt(m.code, 0, 255)) && (m.signal === null || isText(m.signal, 16)) ? undefined : "a malformed exit message";
    case "egress":
      return isInt(m.id, 1) && isText(m.host, 255) && isInt(m.port, 1, 65535) && isText(m.via, 16) && (m.pid === undefined || isInt(m.pid, 1)) ? undefined : "a malformed egress request";
    case "resolve":
      return isInt(m.id, 1) && isText(m.name, 255) && (m.family === 4 || m.family === 6) && (m.pid === undefined || isInt(m.pid, 1)) ? undefined : "a malformed resolve request";
    case "watch-events":
      return isInt(m.watch, 1) && Array.isArray(m.events) && m.events.length >= 1 && m.events.length <= MAX_WATCH_BATCH && m.events.every(isWatchEvent) ? undefined : "a malformed watch-events message";
    case "watch-end":
      return isInt(m.watch, 1) && isText(m.code, 64) && isText(m.message) ? undefined : "a malformed watch-end message";
    default:
      return `an unknown message type ${JSON.stringify(String(m.t)).slice(0, 40)}`;
  }
}
