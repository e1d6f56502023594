/**
 * A kernel byte stream: two ends joined back to back, as a loopback TCP
 * connection (or a child's stdio pipe) is. Each end has an owner — a guest's
 * channel or a host-side socket — that writes into its end and receives what the
 * other end wrote.
 *
 * The kernel holds no data: a write is handed straight to the peer's owner. What
 * bounds memory is the credit window: an end may have at most `window` bytes
 * written and not yet credited back by the peer's owner. A writer that ignores
 * the window breaks the protocol and its stream is reset, so one guest can
 * never make the host buffer without bound.
 *
 * State moves only through `#transition`, which checks each move against the
 * table below. Invariant: once an end is closed its owner is never called again.
 */
import { AgentVmError } from "../errors.ts";

export interface StreamOwner {
  /** Bytes the peer wrote. The owner must credit them back once consumed. */
  data(chunk: Buffer): void;
  /** The peer will write no more (half-close). */
  end(): void;
  /** The stream is gone; `reset` means abruptly (ECONNRESET), not after both sides ended. */
  close(reset: boolean): void;
  /** The peer consumed `bytes` of what this end wrote: that much may be written again. */
  credit(bytes: number): void;
}

type EndState = "open" | "writeEnded" | "closed";

const MOVES: Record<EndState, readonly EndState[]> = {
  open: ["writeEnded", "closed"],
  writeEnded: ["closed"],
  closed: [],
};

export interface StreamStats {
  open: number;
  inFlightBytes: number;
}

export class StreamEnd {
  #state: EndState = "open";
  #peer!: StreamEnd;
  #owner: StreamOwner;
  #inFlight = 0;
  #peerEnded = false;
  readonly #window: number;
  readonly #stats: StreamStats;
  readonly #onClosed: (() => void) | undefined;

  private constructor(owner: StreamOwner, window: number, stats: StreamStats, onClosed?: () => void) {
    this.#owner = owner;
    this.#window = window;
    this.#stats = stats;
    this.#onClosed = onClosed;
  }

  /** Joins two owners. `onClosed` runs once, when both ends are closed. */
  static pair(a: StreamOwner, b: StreamOwner, window: number, stats: StreamStats, onClosed?: () => void): [StreamEnd, StreamEnd] {
    let remaining = 2;
    const done = () => {
      if (--remaining === 0) {
        stats.open--;
        onClosed?.();
      }
    };
    const first = new StreamEnd(a, window, stats, done);
    const second = new StreamEnd(b, window, stats, done);
    first.#peer = second;
    second.#peer = first;
    stats.open++;
    return [first, second];
  }

  get closed(): boolean {
    return this.#state === "closed";
  }

  get writable(): boolean {
    return this.#state === "open" && !this.#peer.closed;
  }

  /** Replaces the owner (a pre-created end handed to a guest on accept). */
  setOwner(owner: StreamOwner): void {
    this.#owner = owner;
  }

  write(chunk: Buffer): void {
    if (!this.writable) {
      // Like TCP: bytes sent to a peer that closed draw a reset, which the writer
      // learns about on a later turn (never inside its own write call).
      if (this.#state === "open" && this.#peer.closed) queueMicrotask(() => this.closed || this.#abort());
      return; // the bytes go nowhere
    }
    if (this.#inFlight + chunk.byteLength > this.#window) {
      this.reset();
      throw new AgentVmError(
        "PROTOCOL_VIOLATION",
        `a stream writer exceeded its ${this.#window}-byte window; the connection was reset`,
      );
    }
    this.#inFlight += chunk.byteLength;
    this.#stats.inFlightBytes += chunk.byteLength;
    this.#peer.#owner.data(chunk);
  }

  end(): void {
    if (this.#state !== "open") return;
    this.#transition("writeEnded");
    if (!this.#peer.closed) this.#peer.#owner.end();
    this.#peer.#peerEnded = true;
    this.#closeIfFinished();
    this.#peer.#closeIfFinished();
  }

  /** This end's owner consumed `bytes` of what the peer wrote. */
  credit(bytes: number): void {
    const peer = this.#peer;
    if (this.closed || bytes <= 0) return;
    const granted = Math.min(bytes, peer.#inFlight);
    peer.#inFlight -= granted;
    this.#stats.inFlightBytes -= granted;
    if (!peer.closed && granted > 0) peer.#owner.credit(granted);
  }

  /**
   * The owner is done with this end, as close(2) is: the peer sees the end of the
   * stream (FIN) — or, when bytes it sent were never consumed here, a reset (RST).
   * A peer that writes after a FIN is reset then (see write).
   */
  close(): void {
    if (this.closed) return;
    const peer = this.#peer;
    const graceful = this.#state === "writeEnded" && this.#peerEnded;
    const unread = peer.#inFlight > 0;
    const wasOpen = this.#state === "open";
    this.#release();
    if (peer.closed) return;
    if (!graceful && unread) return peer.#abort();
    if (wasOpen) {
      peer.#peerEnded = true;
      peer.#owner.end();
    }
    peer.#closeIfFinished();
  }

  reset(): void {
    if (this.closed) return;
    this.#release();
    if (!this.#peer.closed) this.#peer.#abort();
  }

  #abort(): void {
    const owner = this.#owner;
    this.#release();
    owner.close(true);
  }

  /** Both directions ended: nothing more can flow, tell the owner and free the end. */
  #closeIfFinished(): void {
    if (this.closed || !(this.#state === "writeEnded" && this.#peerEnded)) return;
    const owner = this.#owner;
    this.#release();
    owner.close(false);
  }

  #release(): void {
    this.#stats.inFlightBytes -= this.#inFlight;
    this.#inFlight = 0;
    this.#transition("closed");
    this.#onClosed?.();
  }

  #transition(next: EndState): void {
    if (!MOVES[this.#state].includes(next)) {
      throw new AgentVmError("INTERNAL", `stream end cannot move from ${this.#state} to ${next}`);
    }
    this.#state = next;
  }
}
