/**
 * Logging of network denials, rate-limited per VM: a guest that retries a
 * refused connection in a loop would otherwise write a log line per attempt.
 * In each window (10 s) the first DENIAL_LOG_BURST denials of a VM are written
 * in full (`agentvm network denied {…}`); the rest are counted, and when the
 * window ends one line says how many (`agentvm network denials {"vm", "more",
 * "message": "N more denials for VM x in the last 10 s"}`). Every denial is
 * still counted and kept in the VM's own record (vm.networkDenials()).
 */
import type { Denial } from "./egress.ts";
import { logEnabled } from "../log.ts";

export const DENIAL_LOG_BURST = 10;
export const DENIAL_LOG_WINDOW_MS = 10_000;

export class DenialLog {
  readonly #vm: string;
  readonly #burst: number;
  readonly #windowMs: number;
  #windowStart = 0;
  #logged = 0;
  #suppressed = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(vm: string, options: { burst?: number; windowMs?: number } = {}) {
    this.#vm = vm;
    this.#burst = options.burst ?? DENIAL_LOG_BURST;
    this.#windowMs = options.windowMs ?? DENIAL_LOG_WINDOW_MS;
  }

  report(denial: Denial): void {
    if (!logEnabled("warn")) return;
    const now = Date.now();
    if (now - this.#windowStart >= this.#windowMs) {
      this.flush();
      this.#windowStart = now;
      this.#logged = 0;
    }
    if (this.#logged < this.#burst) {
      this.#logged++;
      console.warn(`agentvm network denied ${JSON.stringify(denial)}`);
      return;
    }
    this.#suppressed++;
    this.#timer ??= setTimeout(() => this.flush(), this.#windowStart + this.#windowMs - now).unref();
  }

  /** Writes the count of denials not logged in full, if any (at the end of a window, or when the VM stops). */
  flush(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#suppressed === 0) return;
    const more = this.#suppressed;
    this.#suppressed = 0;
    const seconds = this.#windowMs / 1000;
    console.warn(`agentvm network denials ${JSON.stringify({ vm: this.#vm, more, windowSeconds: seconds, message: `${more} more denials for VM ${this.#vm} in the last ${seconds} s` })}`);
  }
}
