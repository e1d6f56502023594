/**
 * A watch as callers hold it, embedded and on the client alike: events go to
 * `onEvent` and to whoever iterates it (`for await (const event of watch)`),
 * `close()` ends it, `closed` tells how it ended.
 *
 * Events wait for an iterator in a bounded queue: past MAX_QUEUED the rest are
 * dropped and one "overflow" event says so, so a watch nobody reads cannot grow
 * its holder's memory.
 */
import { AgentVmError } from "./errors.ts";
import type { WatchEvent } from "./init/protocol.ts";

export type { WatchEvent };

export interface WatchOptions {
  /** Watch the whole tree under a directory, not just its entries (default false). */
  recursive?: boolean;
  /** Called for every event as it arrives. */
  onEvent?: (event: WatchEvent) => void;
}

export interface VmWatch extends AsyncIterable<WatchEvent> {
  /** The watched guest path. */
  readonly path: string;
  /**
   * Settles when the watch ends: resolves after close(), rejects with an
   * AgentVmError when it ended otherwise (the path was deleted: ENOENT; the VM
   * stopped: SANDBOX_EXITED or VM_DISPOSED; the reader fell behind: EVENTS_TOO_SLOW).
   */
  readonly closed: Promise<void>;
  close(): Promise<void>;
}

const MAX_QUEUED = 10_000;

export class WatchStream implements VmWatch {
  readonly path: string;
  readonly closed: Promise<void>;
  readonly #onEvent: ((event: WatchEvent) => void) | undefined;
  readonly #stop: () => void;
  readonly #settle: PromiseWithResolvers<void>;
  readonly #queue: WatchEvent[] = [];
  #dropped = false;
  #waiter: (() => void) | undefined;
  #ended = false;
  #error: AgentVmError | undefined;

  /** `stop` releases what the watch holds (an inotify watch, an HTTP stream); called once. */
  constructor(path: string, onEvent: ((event: WatchEvent) => void) | undefined, stop: () => void) {
    this.path = path;
    this.#onEvent = onEvent;
    this.#stop = stop;
    this.#settle = Promise.withResolvers<void>();
    this.closed = this.#settle.promise;
    this.closed.catch(() => {});
  }

  push(events: readonly WatchEvent[]): void {
    if (this.#ended) return;
    for (const event of events) {
      this.#onEvent?.(event);
      if (this.#queue.length < MAX_QUEUED) this.#queue.push(event);
      else if (!this.#dropped) {
        this.#dropped = true;
        this.#queue[MAX_QUEUED - 1] = { type: "overflow", path: this.path };
      }
    }
    this.#wake();
  }

  /** Ends the watch: cleanly without an error, else closed rejects (after the queued events are read). */
  end(error?: AgentVmError): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#error = error;
    this.#stop();
    if (error) this.#settle.reject(error);
    else this.#settle.resolve();
    this.#wake();
  }

  async close(): Promise<void> {
    this.end();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<WatchEvent> {
    try {
      for (;;) {
        const event = this.#queue.shift();
        if (event) {
          if (this.#queue.length === 0) this.#dropped = false;
          yield event;
          continue;
        }
        if (this.#ended) {
          if (this.#error) throw this.#error;
          return;
        }
        await new Promise<void>((resolve) => (this.#waiter = resolve));
      }
    } finally {
      // Breaking out of a for-await loop ends the watch.
      this.end();
    }
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }
}
