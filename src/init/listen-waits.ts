/**
 * Connections to a port that a just-started program has not opened yet: init
 * waits for the listen itself, so the server asks once instead of retrying.
 *
 * Linux offers no event for "a socket started listening" that init can use
 * (sock_diag broadcasts only socket destruction; bpf is refused by the VM's
 * syscall filter; inotify does not see /proc/net), so one timer re-reads the
 * VM's listening ports (/proc/net/tcp, tcp6) every POLL_MS while any
 * connection waits, for all of them at once.
 */
import type { Socket } from "node:net";
import { connectToPort } from "./port-connector.ts";
import { listeningPorts } from "./proc-reader.ts";
import { MAX_LISTEN_WAIT, type ListenWait } from "./protocol.ts";

/** How often the listening ports are re-read while a connection waits. */
export const POLL_MS = 2;

interface Waiter {
  port: number;
  /** Whether a program that may still open the port is left (its own deadline not passed). */
  waiting(now: number): boolean;
  settle(listening: boolean): void;
}

export class ListenWaits {
  readonly #running: (pid: number) => boolean;
  readonly #listening: () => Iterable<number>;
  readonly #connect: (port: number) => Promise<Socket>;
  readonly #waiters = new Set<Waiter>();
  #timer: NodeJS.Timeout | undefined;

  /** `running` says whether one of init's programs still runs; the others are for tests. */
  constructor(running: (pid: number) => boolean, listening: () => Iterable<number> = listeningPorts, connect: (port: number) => Promise<Socket> = connectToPort) {
    this.#running = running;
    this.#listening = listening;
    this.#connect = connect;
  }

  /** A connection to `port`, waiting for a listener while one of `wait`'s programs may still open it; ECONNREFUSED otherwise. */
  async connect(port: number, wait: readonly ListenWait[] = []): Promise<Socket> {
    const since = Date.now();
    const programs = wait.slice(0, MAX_LISTEN_WAIT.programs).map(({ pid, ms }) => ({ pid, until: since + Math.min(ms, MAX_LISTEN_WAIT.ms) }));
    const waiting = (now: number) => programs.some(({ pid, until }) => now < until && this.#running(pid));
    for (;;) {
      try {
        return await this.#connect(port);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ECONNREFUSED" || !(await this.#whenListening(port, waiting))) throw error;
      }
    }
  }

  /** Resolves true once `port` listens, false once no program is left to open it; always after at least one tick. */
  #whenListening(port: number, waiting: (now: number) => boolean): Promise<boolean> {
    if (!waiting(Date.now())) return Promise.resolve(false);
    const { promise, resolve } = Promise.withResolvers<boolean>();
    const waiter: Waiter = {
      port,
      waiting,
      settle: (listening) => {
        this.#waiters.delete(waiter);
        resolve(listening);
      },
    };
    this.#waiters.add(waiter);
    this.#timer ??= setInterval(() => this.#tick(), POLL_MS);
    return promise;
  }

  #tick(): void {
    const listening = new Set(this.#listening());
    const now = Date.now();
    for (const waiter of this.#waiters) {
      // Waiting first: a port that listens but refuses (bound elsewhere than loopback) must not loop for ever.
      if (!waiter.waiting(now)) waiter.settle(false);
      else if (listening.has(waiter.port)) waiter.settle(true);
    }
    if (this.#waiters.size === 0) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }
}
