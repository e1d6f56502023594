/**
 * Credit-based flow control for one kernel stream, shared by guest sockets and
 * host-side sockets (vmFetch). See protocol.ts for the rules.
 */
import { CREDIT_BATCH, MAX_DATA_CHUNK, STREAM_WINDOW } from "./protocol.ts";

/**
 * Sends bytes only while the peer has granted credit; queues the rest. A write's
 * callback runs once all its bytes are sent, which is what gives the writing
 * stream its backpressure.
 */
export class WindowedWriter {
  #credit: number;
  #queue: { chunk: Buffer; callback: (error?: Error | null) => void }[] = [];
  readonly #send: (chunk: Buffer) => void;

  constructor(send: (chunk: Buffer) => void, window = STREAM_WINDOW) {
    this.#send = send;
    this.#credit = window;
  }

  write(chunk: Buffer, callback: (error?: Error | null) => void): void {
    this.#queue.push({ chunk, callback });
    if (this.#queue.length === 1) this.#drain();
  }

  credit(bytes: number): void {
    this.#credit += bytes;
    this.#drain();
  }

  /** Fails every queued write (the stream closed under it). */
  abort(error: Error): void {
    const queue = this.#queue;
    this.#queue = [];
    for (const item of queue) item.callback(error);
  }

  #drain(): void {
    while (this.#queue.length > 0 && this.#credit > 0) {
      const head = this.#queue[0]!;
      const size = Math.min(head.chunk.byteLength, this.#credit, MAX_DATA_CHUNK);
      const whole = size === head.chunk.byteLength;
      this.#credit -= size;
      this.#send(whole ? head.chunk : head.chunk.subarray(0, size));
      if (whole) {
        this.#queue.shift();
        head.callback();
      } else {
        head.chunk = head.chunk.subarray(size);
      }
    }
  }
}

/** Counts consumed bytes and returns them to the writer in batches. */
export class CreditBatcher {
  #pending = 0;
  readonly #send: (bytes: number) => void;

  constructor(send: (bytes: number) => void) {
    this.#send = send;
  }

  consumed(bytes: number): void {
    this.#pending += bytes;
    if (this.#pending >= CREDIT_BATCH) this.flush();
  }

  flush(): void {
    if (this.#pending === 0) return;
    const bytes = this.#pending;
    this.#pending = 0;
    this.#send(bytes);
  }
}
