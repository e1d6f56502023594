/**
 * exec round trip in a warm VM: `exec("sh", ["-c", "true"])` from the call to
 * the exit code, with the VM's sandbox already running, against
 * `child_process.execFile("sh", ["-c", "true"])` on the host. Alternating
 * rounds, so background noise lands on both sides.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { createBenchVm } from "./guest.ts";
import { now, percentile } from "./stats.ts";

const execFileAsync = promisify(execFile);

export interface ExecResult {
  calls: number;
  vm: { p50: number; p95: number };
  baseline: { p50: number; p95: number };
}

export interface ExecOptions {
  dataDir: string;
  warmupCalls: number;
  calls: number;
  rounds: number;
  log(message: string): void;
}

export async function benchExec(options: ExecOptions): Promise<ExecResult> {
  const vm = await createBenchVm(options.dataDir, "bench-exec");
  try {
    const inVm = async () => {
      const result = await vm.exec("sh", ["-c", "true"]);
      if (result.exitCode !== 0) throw new Error(`sh -c true exited with ${result.exitCode}: ${result.stderr}`);
    };
    const onHost = async () => void (await execFileAsync("sh", ["-c", "true"]));
    // The first exec starts the sandbox; it and the warm-up calls are not counted.
    for (let i = 0; i < options.warmupCalls; i++) await inVm();
    for (let i = 0; i < options.warmupCalls; i++) await onHost();
    options.log(`exec sh -c true: ${options.calls} calls per side, ${options.rounds} alternating rounds`);
    const vmTimes: number[] = [];
    const hostTimes: number[] = [];
    const perRound = Math.ceil(options.calls / options.rounds);
    for (let round = 0; round < options.rounds; round++) {
      for (let i = 0; i < perRound; i++) hostTimes.push(await timed(onHost));
      for (let i = 0; i < perRound; i++) vmTimes.push(await timed(inVm));
    }
    const summary = (times: number[]) => ({ p50: percentile(times, 50), p95: percentile(times, 95) });
    return { calls: vmTimes.length, vm: summary(vmTimes), baseline: summary(hostTimes) };
  } finally {
    await vm.dispose();
  }
}

async function timed(call: () => Promise<void>): Promise<number> {
  const start = now();
  await call();
  return now() - start;
}
