/**
 * vmFetch throughput against a direct-loopback baseline, measured back to back
 * in this run (DESIGN §5: this machine is noisy, so only same-run ratios mean
 * anything). Both sides: one tiny "ok" server, the same request loop, keep-alive.
 *
 * Other work on the machine comes and goes, so the measured time is split into
 * rounds that alternate baseline and vmFetch: a burst of background load then
 * lands on both sides instead of skewing the ratio.
 */
import type { Vm } from "agentvm";
import { directFetcher, newKeepAliveAgent, startBaselineServer } from "./baseline-server.ts";
import { GUEST_PORT, OK_SERVER, createBenchVm, startGuestServer, stopGuest } from "./guest.ts";
import { combine, measure, warmUp, type FetchOnce, type LoadResult, type LoadSlice } from "./load.ts";

export interface ThroughputCase {
  label: string;
  concurrency: number;
  vm: LoadResult;
  baseline: LoadResult;
}

export interface VmFetchOptions {
  dataDir: string;
  /** Unmeasured, per side. */
  warmupMs: number;
  /** Measured, per side, split into `rounds` alternating slices. */
  durationMs: number;
  rounds: number;
  concurrencies: readonly number[];
  log(message: string): void;
}

export async function benchVmFetch(options: VmFetchOptions): Promise<ThroughputCase[]> {
  const baseline = await startBaselineServer();
  const agent = newKeepAliveAgent();
  const vm = await createBenchVm(options.dataDir, "bench-fetch");
  try {
    const pid = await startGuestServer(vm, "server.js", OK_SERVER);
    const direct = directFetcher(agent, baseline.port);
    const viaVm = vmFetcher(vm);
    const cases: ThroughputCase[] = [];
    for (const concurrency of options.concurrencies) {
      const label = concurrency === 1 ? "sequential" : `${concurrency} concurrent`;
      options.log(`vmFetch throughput, ${label}: ${options.rounds} alternating rounds per side`);
      cases.push({ label, concurrency, ...(await compare(direct, viaVm, concurrency, options)) });
    }
    await stopGuest(vm, pid);
    return cases;
  } finally {
    agent.destroy();
    await vm.dispose();
    await baseline.stop();
  }
}

/** Warm-up per side, then `rounds` measured slices alternating baseline and agentvm. Shared by the preview bench. */
export async function compare(
  direct: FetchOnce,
  viaVm: FetchOnce,
  concurrency: number,
  options: Pick<VmFetchOptions, "warmupMs" | "durationMs" | "rounds">,
): Promise<{ vm: LoadResult; baseline: LoadResult }> {
  await warmUp(direct, concurrency, options.warmupMs);
  await warmUp(viaVm, concurrency, options.warmupMs);
  const slice = options.durationMs / options.rounds;
  const baseline: LoadSlice[] = [];
  const vm: LoadSlice[] = [];
  for (let round = 0; round < options.rounds; round++) {
    baseline.push(await measure(direct, concurrency, slice));
    vm.push(await measure(viaVm, concurrency, slice));
  }
  return { vm: combine(vm), baseline: combine(baseline) };
}

function vmFetcher(vm: Vm): FetchOnce {
  return async () => {
    const response = await vm.vmFetch(GUEST_PORT, "/");
    if (response.status !== 200 || response.body.length !== 2) throw new Error(`guest answered ${response.status} with ${response.body.length} bytes`);
  };
}
