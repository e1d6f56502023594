/**
 * Small helpers shared by the benchmarks: percentiles, sleeping, the clock
 * every benchmark reads (one clock, so numbers compare), a free port.
 */
import { createServer } from "node:net";
import { performance } from "node:perf_hooks";

/** Milliseconds on a monotonic clock. */
export function now(): number {
  return performance.now();
}

/**
 * Wall-clock milliseconds since the epoch with sub-millisecond precision.
 * Guests stamp their own timeline with the same expression, so host and guest
 * stamps line up (both read the system clock; bubblewrap does not unshare time).
 */
export function wallNow(): number {
  return performance.timeOrigin + performance.now();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Nearest-rank percentile (p in 0..100) of an unsorted list; NaN when empty. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

export function mean(values: readonly number[]): number {
  return values.length === 0 ? Number.NaN : values.reduce((sum, value) => sum + value, 0) / values.length;
}

/** Calls `read` now and every `intervalMs` until stopped; stop() returns every reading, the last one taken at stop. */
export function sampleEvery<T>(intervalMs: number, read: () => T): { stop(): T[] } {
  const readings: T[] = [read()];
  const timer = setInterval(() => readings.push(read()), intervalMs);
  return {
    stop() {
      clearInterval(timer);
      readings.push(read());
      return readings;
    },
  };
}

/** A TCP port free on 127.0.0.1 right now (for a baseline server that must be told its port). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}
