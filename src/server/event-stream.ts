/**
 * A Server-Sent Events response (the events and watch routes): events are
 * written as they come, a subscriber that stops reading is cut off rather than
 * buffered for, and the stream ends with a last `error` event saying why.
 */
import type { ServerResponse } from "node:http";
import { AgentVmError } from "../errors.ts";

/** How far a subscriber may fall behind before it is cut off, and how long its last words wait to be read. */
const BUFFER_BYTES = 8 * 1024 * 1024;
const DRAIN_MS = 5_000;
const HEARTBEAT_MS = 15_000;

export class EventStream {
  readonly #response: ServerResponse;
  #open = false;
  #ended = false;
  /** Events sent before open(): written right after the `: connected` line. */
  #early: string[] = [];
  readonly #onEnd: () => void;

  /** `onEnd` runs once, when the stream ends for any reason (the client left, or closeWith). */
  constructor(response: ServerResponse, onEnd: () => void) {
    this.#response = response;
    this.#onEnd = onEnd;
    response.once("close", () => this.#finish());
  }

  /** Sends the headers and the `: connected` line the client waits for. */
  open(): void {
    const response = this.#response;
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", "x-accel-buffering": "no" });
    response.flushHeaders();
    response.write(": connected\n\n");
    this.#open = true;
    for (const block of this.#early) response.write(block);
    this.#early = [];
    const heartbeat = setInterval(() => response.write(": keep-alive\n\n"), HEARTBEAT_MS);
    heartbeat.unref();
    response.once("close", () => clearInterval(heartbeat));
  }

  send(event: string, data: unknown): void {
    if (this.#ended) return;
    const block = `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
    if (!this.#open) {
      this.#early.push(block);
      return;
    }
    // A subscriber that does not read would make the server hold every event for it.
    if (this.#response.writableLength > BUFFER_BYTES) {
      this.closeWith(new AgentVmError("EVENTS_TOO_SLOW", `this event stream fell more than ${BUFFER_BYTES} bytes behind and was closed; read events as they come, or reconnect`));
      return;
    }
    this.#response.write(block);
  }

  /** Ends the stream with a last `error` event saying why. */
  closeWith(reason: AgentVmError): void {
    if (this.#ended) return;
    this.#finish();
    // The connection ends with the stream (not kept alive), and if the reader never reads
    // again, what is buffered for it is let go.
    const socket = this.#response.socket;
    this.#response.end(`event: error\ndata: ${JSON.stringify(reason.toJSON())}\n\n`, () => socket?.end());
    setTimeout(() => socket?.destroy(), DRAIN_MS).unref();
  }

  #finish(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#onEnd();
  }
}
