/**
 * Connections to a port that a just-started program has not opened yet: init
 * waits for the listen itself, so the server asks once instead of retrying.
 *
 * Linux offers no event for "a socket started listening" that init can use
 * (sock_diag broadcasts only socket destruction; bpf is refused by the VM's
 * syscall filter; inotify does not see /proc/net). Re-reading /proc/net/tcp
 * is no good either: the kernel walks the host's whole connection table for
 * it, milliseconds per read on a busy host. So init probes: one connect per
 * waited-for port every POLL_MS (a refused connect on loopback costs
 * microseconds), on one timer for all waiting connections; the probe that
 * succeeds is the connection handed over.
 */
import type { Socket } from "node:net";
import { connectToPort } from "./port-connector.ts";
import { MAX_LISTEN_WAIT, type ListenWait } from "./protocol.ts";

/** How often a waited-for port is probed. */
export const POLL_MS = 2;

/** What a wait ends with: a connection (the probe's), "listening" (connect again), or "none" (nothing left to wait for). */
type Outcome = Socket | "listening" | "none";

interface Waiter {
  /** Whether a program that may still open the port is left (its own deadline not passed). */
  waiting(now: number): boolean;
  settle(outcome: Outcome): void;
}

export class ListenWaits {
  readonly #running: (pid: number) => boolean;
  readonly #connect: (port: number) => Promise<Socket>;
  readonly #waiters = new Map<number, Set<Waiter>>();
  readonly #probing = new Set<number>();
  #timer: NodeJS.Timeout | undefined;

  /** `running` says whether one of init's programs still runs; `connect` is for tests. */
  constructor(running: (pid: number) => boolean, connect: (port: number) => Promise<Socket> = connectToPort) {
    this.#running = running;
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
        if ((error as NodeJS.ErrnoException).code !== "ECONNREFUSED") throw error;
        const outcome = await this.#whenListening(port, waiting);
        if (outcome === "none") throw error;
        if (outcome !== "listening") return outcome;
      }
    }
  }

  #whenListening(port: number, waiting: (now: number) => boolean): Promise<Outcome> {
    if (!waiting(Date.now())) return Promise.resolve("none");
    const { promise, resolve } = Promise.withResolvers<Outcome>();
    let waiters = this.#waiters.get(port);
    if (!waiters) this.#waiters.set(port, (waiters = new Set()));
    const waiter: Waiter = {
      waiting,
      settle: (outcome) => {
        waiters.delete(waiter);
        if (waiters.size === 0 && this.#waiters.get(port) === waiters) this.#waiters.delete(port);
        resolve(outcome);
      },
    };
    waiters.add(waiter);
    this.#timer ??= setInterval(() => this.#tick(), POLL_MS);
    return promise;
  }

  #tick(): void {
    const now = Date.now();
    for (const [port, waiters] of this.#waiters) {
      for (const waiter of waiters) if (!waiter.waiting(now)) waiter.settle("none");
      if (waiters.size > 0 && !this.#probing.has(port)) this.#probe(port);
    }
    if (this.#waiters.size === 0) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }

  /** One connect to a waited-for port: its connection goes to the first waiter, the others connect on their own. */
  #probe(port: number): void {
    this.#probing.add(port);
    this.#connect(port).then(
      (socket) => {
        this.#probing.delete(port);
        const waiters = [...(this.#waiters.get(port) ?? [])];
        if (waiters.length === 0) return void socket.destroy(); // they gave up meanwhile
        waiters[0]!.settle(socket);
        for (const waiter of waiters.slice(1)) waiter.settle("listening");
      },
      () => this.#probing.delete(port), // not yet (or not at all: the waiters' deadlines end it)
    );
  }
}
