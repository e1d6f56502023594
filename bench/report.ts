/**
 * Turns benchmark results into the printed table. Targets are informational:
 * PASS/MISS is shown, never enforced, because a noisy machine must not turn a
 * benchmark run into a failed build.
 */
import type { MemoryResult } from "./memory.ts";
import type { PreviewsResult } from "./previews.ts";
import type { IdleVmsResult, ServerActionsResult } from "./server-actions.ts";
import type { ProcMemory } from "./procfs.ts";
import type { SpawnSummary } from "./spawn.ts";
import type { ThroughputCase } from "./vm-fetch.ts";

export interface Row {
  metric: string;
  agentvm: string;
  baseline: string;
  /** agentvm ÷ baseline. */
  ratio: string;
  target: string;
  result: string;
}

export interface Target {
  kind: "min-ratio" | "max-value";
  limit: number;
}

export function verdict(value: number, target: Target): "PASS" | "MISS" {
  const ok = target.kind === "min-ratio" ? value >= target.limit : value <= target.limit;
  return ok ? "PASS" : "MISS";
}

const EMPTY = "—";

function int(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toLocaleString("en-US") : EMPTY;
}
function fixed(value: number, digits = 1): string {
  return Number.isFinite(value) ? value.toFixed(digits) : EMPTY;
}
function ratio(value: number, baseline: number): string {
  return baseline > 0 && Number.isFinite(value) ? fixed(value / baseline, 2) : EMPTY;
}

export function throughputRows(cases: ThroughputCase[], targets: Record<number, Target>, name = "vmFetch"): Row[] {
  const rows: Row[] = [];
  for (const c of cases) {
    const target = targets[c.concurrency];
    const r = c.vm.perSecond / c.baseline.perSecond;
    rows.push({
      metric: `${name} req/s, ${c.label}`,
      agentvm: int(c.vm.perSecond),
      baseline: int(c.baseline.perSecond),
      ratio: fixed(r, 2),
      target: target ? `ratio ≥ ${fixed(target.limit, 2)}` : EMPTY,
      result: target ? verdict(r, target) : "",
    });
    rows.push({
      metric: `  p50 latency ms, ${c.label}`,
      agentvm: fixed(c.vm.p50Ms, 2),
      baseline: fixed(c.baseline.p50Ms, 2),
      ratio: ratio(c.vm.p50Ms, c.baseline.p50Ms),
      target: EMPTY,
      result: "",
    });
  }
  return rows;
}

export function spawnRows(warm: SpawnSummary, cold: SpawnSummary, target: Target): Row[] {
  const plain = (metric: string, value: string): Row => ({ metric, agentvm: value, baseline: EMPTY, ratio: EMPTY, target: EMPTY, result: "" });
  return [
    {
      ...plain(`spawn → first response p50 ms, ${warm.label}`, fixed(warm.p50)),
      target: `≤ ${target.limit} ms`,
      result: verdict(warm.p50, target),
    },
    plain(`spawn → first response p95 ms, ${warm.label}`, fixed(warm.p95)),
    plain(`spawn → first response p50 ms, ${cold.label}`, fixed(cold.p50)),
  ];
}

export function memoryRows(pool0: MemoryResult, pool1: MemoryResult, baseline: ProcMemory | undefined, target: Target): Row[] {
  const baselinePrivate = baseline ? baseline.privateKb / 1024 : Number.NaN;
  const baselinePss = baseline ? baseline.pssKb / 1024 : Number.NaN;
  const row = (metric: string, value: number, base = Number.NaN): Row => ({
    metric,
    agentvm: fixed(value),
    baseline: Number.isFinite(base) ? fixed(base) : EMPTY,
    ratio: ratio(value, base),
    target: EMPTY,
    result: "",
  });
  return [
    { ...row("private MB per VM, 1 server, poolSize 0", pool0.privateMb, baselinePrivate), target: `≤ ${target.limit} MB`, result: verdict(pool0.privateMb, target) },
    row("  of which the guest node process", pool0.nodePrivateMb, baselinePrivate),
    row("Pss MB per VM, poolSize 0", pool0.pssMb, baselinePss),
    row("host RSS growth MB per VM, poolSize 0", pool0.hostRssMb),
    row("private MB per VM, 1 server, poolSize 1 (default)", pool1.privateMb),
    row("Pss MB per VM, poolSize 1", pool1.pssMb),
    row("host RSS growth MB per VM, poolSize 1", pool1.hostRssMb),
    row("  warm pool cost, private MB per VM", pool1.privateMb - pool0.privateMb),
  ];
}

function targetText(target: Target, unit = ""): string {
  if (target.kind === "min-ratio") return `ratio ≥ ${fixed(target.limit, 2)}`;
  return target.limit === 0 ? "= 0" : `≤ ${target.limit}${unit}`;
}

function plainRow(metric: string, agentvm: string, baseline = EMPTY, ratioText = EMPTY): Row {
  return { metric, agentvm, baseline, ratio: ratioText, target: EMPTY, result: "" };
}

function targeted(row: Row, value: number, target: Target, unit = ""): Row {
  return { ...row, target: targetText(target, unit), result: verdict(value, target) };
}

export function downloadRows(result: PreviewsResult, growthTarget: Target): Row[] {
  const { baseline, preview, vmFetchStream } = result.download;
  const gib = ((result.downloadChunks * 64) / 1024 / 1024).toFixed(2).replace(/\.00$/, "");
  const rows: Row[] = [];
  for (const [name, download] of [["preview gateway", preview], ["client vmFetchStream", vmFetchStream]] as const) {
    rows.push(plainRow(`${gib} GiB download MB/s, ${name}`, int(download.mbPerSecond), int(baseline.mbPerSecond), ratio(download.mbPerSecond, baseline.mbPerSecond)));
    rows.push(targeted(plainRow(`  server peak RSS growth MB during it`, fixed(download.peakGrowthMb), fixed(baseline.peakGrowthMb)), download.peakGrowthMb, growthTarget, " MB"));
  }
  return rows;
}

export function serverActionRows(result: ServerActionsResult, targets: { createP50Ms: Target; sandboxes: Target }): Row[] {
  const { writeFile, exists, create, idle, idlePool0, pooled } = result;
  const latency = (metric: string, vm: number, base: number) => plainRow(metric, fixed(vm, 2), fixed(base, 2), ratio(vm, base));
  const idleRows = (idleResult: IdleVmsResult, label: string): Row[] => [
    plainRow(`server RSS growth KB per idle VM, ${idleResult.vms} VMs, ${label}`, int(idleResult.perVmKb)),
    plainRow(`  server RSS growth MB, all ${idleResult.vms}`, fixed(idleResult.rssAfterMb - idleResult.rssBeforeMb)),
    targeted(plainRow(`  sandboxes for those VMs (none spawned)`, int(idleResult.sandboxes)), idleResult.sandboxes, targets.sandboxes),
    ...(idleResult.sandboxes > 0 ? [plainRow(`  their guests' private MB, total`, int(idleResult.sandboxPrivateMb))] : []),
  ];
  return [
    latency("action round trip p50 ms, writeFile 100 B", writeFile.vm.p50, writeFile.baseline.p50),
    latency("  p95 ms, writeFile", writeFile.vm.p95, writeFile.baseline.p95),
    latency("action round trip p50 ms, exists", exists.vm.p50, exists.baseline.p50),
    latency("  p95 ms, exists", exists.vm.p95, exists.baseline.p95),
    targeted(latency(`VM create + first action p50 ms, ${create.vms} new keys`, create.vm.p50, create.baseline.p50), create.vm.p50, targets.createP50Ms, " ms"),
    latency("  p95 ms", create.vm.p95, create.baseline.p95),
    latency("  p50 ms on a poolSize 0 server (no guest launch)", create.vmPool0.p50, create.baseline.p50),
    latency("  p95 ms on a poolSize 0 server", create.vmPool0.p95, create.baseline.p95),
    targeted(plainRow(`  sandboxes started for the ${create.vms} new VMs`, int(create.sandboxesForKeys)), create.sandboxesForKeys, targets.sandboxes),
    ...idleRows(idle, "default (poolSize 1)"),
    ...idleRows(idlePool0, "poolSize 0"),
    plainRow(`exec node -e 0 p50 ms, ${pooled.vms} new VMs, poolIdleMs ${pooled.poolIdleMs}`, fixed(pooled.execP50Ms)),
    plainRow(`  pooled guests alive at once, peak`, int(pooled.peakPooledGuests)),
    plainRow(`  private MB per pooled guest`, fixed(pooled.peakPooledGuests > 0 ? pooled.peakPooledPrivateMb / pooled.peakPooledGuests : Number.NaN)),
    plainRow(`  server RSS growth MB, peak while pooled`, fixed(pooled.rssPeakMb - pooled.rssBeforeMb)),
    plainRow(`  pools drained, s after the last exec`, fixed(pooled.drainedAfterMs / 1000)),
    targeted(plainRow(`  sandboxes after the drain`, int(pooled.sandboxesAfterDrain)), pooled.sandboxesAfterDrain, targets.sandboxes),
    plainRow(`  server RSS growth MB after the drain`, fixed(pooled.rssAfterDrainMb - pooled.rssBeforeMb)),
  ];
}

/** Where spawn → first response goes: p50 ms after the spawn() call, per milestone. */
export function phaseRows(warm: SpawnSummary, cold: SpawnSummary): string[][] {
  const names: [keyof SpawnSummary["phasesP50"], string][] = [
    ["nodeStarted", "guest node process started (guest timeOrigin)"],
    ["spawnReturned", "spawn() resolved (host)"],
    ["programStarted", "first line of the server script ran (guest)"],
    ["listening", "listen() callback (guest)"],
    ["listenerSeen", "first vmFetch not refused began (host)"],
    ["handled", "first request reached the handler (guest)"],
    ["firstResponse", "first 200 received (host)"],
  ];
  // A pooled guest's node started before the spawn call: say so instead of printing a negative time.
  const show = (value: number) => (value < 0 ? "pooled" : fixed(value));
  return [
    ["milestone, p50 ms after the spawn() call", warm.label, cold.label],
    ...names.map(([key, name]) => [name, show(warm.phasesP50[key]), show(cold.phasesP50[key])]),
    ["slowest spawn() call (pool empty if far above p50)", fixed(warm.spawnCallMaxMs), fixed(cold.spawnCallMaxMs)],
    ["iterations that met ECONNRESET before 200", `${warm.iterationsWithReset}/${warm.iterations}`, `${cold.iterationsWithReset}/${cold.iterations}`],
  ];
}

export function renderRows(rows: Row[]): string {
  const header = ["metric", "agentvm", "baseline", "ratio", "target", "result"];
  return renderGrid([header, ...rows.map((r) => [r.metric, r.agentvm, r.baseline, r.ratio, r.target, r.result])]);
}

/** Plain-text grid: first column left-aligned, the rest right-aligned (numbers). */
export function renderGrid(grid: string[][]): string {
  const widths = grid[0]!.map((_, column) => Math.max(...grid.map((line) => [...(line[column] ?? "")].length)));
  const pad = (text: string, column: number) => {
    const gap = " ".repeat(widths[column]! - [...text].length);
    return column === 0 ? text + gap : gap + text;
  };
  const lines = grid.map((line) => line.map(pad).join("  ").trimEnd());
  const rule = "-".repeat(Math.max(...lines.map((line) => [...line].length)));
  return [lines[0], rule, ...lines.slice(1)].join("\n");
}
