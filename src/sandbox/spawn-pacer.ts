/**
 * Paces one VM's start-up work on the server (DESIGN §4: the server survives
 * anything a guest does): spawns, and starts of the VM's sandbox (a VM whose
 * init keeps dying would otherwise make the server start a sandbox per
 * request). A token bucket: a burst goes through at once, then work waits its
 * turn, so one VM churning spawns takes a bounded share of the event loop and
 * other VMs' requests keep being served. Waiting is bounded too: past
 * `maxWaiting` callers are refused with LIMIT_EXCEEDED rather than queued.
 */
import { AgentVmError } from "../errors.ts";

export interface PaceOptions {
  /** Work that may start at once after a quiet spell. */
  burst: number;
  /** Work per second after the burst. */
  perSecond: number;
  maxWaiting: number;
  /** Names the work in the refusal, e.g. "spawns of VM x". */
  what: string;
}

export class SpawnPacer {
  readonly #options: PaceOptions;
  #tokens: number;
  #refilledAt = Date.now();
  #waiting = 0;
  /** When the last queued caller may go: callers are served in order. */
  #nextSlot = 0;

  constructor(options: PaceOptions) {
    this.#options = options;
    this.#tokens = options.burst;
  }

  /** Resolves when this piece of work may start. */
  async take(): Promise<void> {
    this.#refill();
    if (this.#tokens >= 1 && this.#waiting === 0) {
      this.#tokens -= 1;
      return;
    }
    if (this.#waiting >= this.#options.maxWaiting) {
      throw new AgentVmError("LIMIT_EXCEEDED", `${this.#options.what}: ${this.#options.maxWaiting} are already waiting to start (${this.#options.perSecond} per second after a burst of ${this.#options.burst}); retry later`);
    }
    const interval = 1000 / this.#options.perSecond;
    const now = Date.now();
    this.#nextSlot = Math.max(this.#nextSlot + interval, now + interval * (1 - this.#tokens));
    this.#tokens = 0;
    this.#waiting++;
    try {
      await new Promise((resolve) => setTimeout(resolve, this.#nextSlot - now));
    } finally {
      this.#waiting--;
      this.#refilledAt = Math.max(this.#refilledAt, Date.now());
    }
  }

  #refill(): void {
    const now = Date.now();
    if (this.#waiting > 0) return;
    const earned = ((now - this.#refilledAt) / 1000) * this.#options.perSecond;
    this.#tokens = Math.min(this.#options.burst, this.#tokens + earned);
    this.#refilledAt = now;
  }
}
