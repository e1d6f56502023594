/**
 * The request loop both throughput targets run. vmFetch and the direct
 * baseline differ only in the `FetchOnce` they pass in, so any cost of the loop
 * itself lands on both sides of the ratio equally.
 */
import { median, now } from "./stats.ts";

/** One complete request: resolves after the whole body has been read. */
export type FetchOnce = () => Promise<void>;

export interface LoadResult {
  requests: number;
  seconds: number;
  perSecond: number;
  /** Median latency of one request, ms. */
  p50Ms: number;
}

/** A measured slice of load: combine slices of one side into a LoadResult. */
export interface LoadSlice {
  seconds: number;
  latencies: number[];
}

/** Unmeasured load: JIT, connection setup and agent pool growth happen here. */
export async function warmUp(fetchOnce: FetchOnce, concurrency: number, durationMs: number): Promise<void> {
  await drive(fetchOnce, concurrency, durationMs);
}

export async function measure(fetchOnce: FetchOnce, concurrency: number, durationMs: number): Promise<LoadSlice> {
  const latencies: number[] = [];
  const started = now();
  await drive(fetchOnce, concurrency, durationMs, latencies);
  return { seconds: (now() - started) / 1000, latencies };
}

export function combine(slices: readonly LoadSlice[]): LoadResult {
  const latencies = slices.flatMap((slice) => slice.latencies);
  const seconds = slices.reduce((sum, slice) => sum + slice.seconds, 0);
  return { requests: latencies.length, seconds, perSecond: latencies.length / seconds, p50Ms: median(latencies) };
}

/** `concurrency` workers, each issuing its next request as soon as the last one finished. */
async function drive(fetchOnce: FetchOnce, concurrency: number, durationMs: number, latencies?: number[]): Promise<void> {
  const deadline = now() + durationMs;
  const worker = async (): Promise<void> => {
    while (now() < deadline) {
      const start = now();
      await fetchOnce();
      latencies?.push(now() - start);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
}
