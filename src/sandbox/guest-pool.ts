/**
 * Pre-started guests for one VM. Starting bubblewrap and Node costs 30–80 ms;
 * a guest that already booted and waits for its program answers `spawn` in a
 * few. The pool holds `size` ready guests, refills in the background after
 * each take, and empties itself when the VM has not spawned for `idleMs`, so
 * an idle VM costs no guest memory.
 */

export interface PooledGuest {
  /** Resolves once the guest has booted and waits for its program. */
  ready: Promise<void>;
  /** Ends the guest (it was never handed out, or the pool is closing). */
  discard(): void;
  /** Settles once the guest's sandbox has exited. */
  closed: Promise<unknown>;
}

export class GuestPool<G extends PooledGuest> {
  readonly #size: number;
  readonly #idleMs: number;
  readonly #start: () => G;
  readonly #ready: G[] = [];
  readonly #starting = new Set<G>();
  #idleTimer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(options: { size: number; idleMs: number; start: () => G }) {
    this.#size = options.size;
    this.#idleMs = options.idleMs;
    this.#start = options.start;
  }

  get readyCount(): number {
    return this.#ready.length;
  }

  /** A ready guest, if one is waiting; refills either way. */
  take(): G | undefined {
    const guest = this.#ready.shift();
    this.fill();
    return guest;
  }

  /** Starts guests until `size` are ready or starting. */
  fill(): void {
    if (this.#closed || this.#size === 0) return;
    this.#armIdleTimer();
    while (this.#ready.length + this.#starting.size < this.#size) {
      let guest: G;
      try {
        guest = this.#start();
      } catch {
        return;
      }
      this.#starting.add(guest);
      guest.ready.then(
        () => {
          this.#starting.delete(guest);
          if (this.#closed) return guest.discard();
          this.#ready.push(guest);
          // It may have booted after an idle drain: it needs a timer of its own to go away.
          this.#armIdleTimer();
        },
        () => {
          // A guest that failed to boot is not retried here: the next spawn
          // starts one directly and reports the real error.
          this.#starting.delete(guest);
        },
      );
    }
  }

  /**
   * Ends every waiting guest; with `close`, also those still booting, and the
   * pool starts no more. Resolves once the ended guests have exited.
   */
  drain(close = false): Promise<void> {
    this.#closed ||= close;
    if (this.#idleTimer) clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
    const ended = [...this.#ready.splice(0), ...(close ? this.#starting : [])];
    for (const guest of ended) guest.discard();
    return Promise.all(ended.map((guest) => guest.closed)).then(() => undefined);
  }

  #armIdleTimer(): void {
    if (this.#idleTimer) this.#idleTimer.refresh();
    else {
      this.#idleTimer = setTimeout(() => void this.drain(), this.#idleMs);
      this.#idleTimer.unref();
    }
  }
}
