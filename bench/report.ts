/**
 * Turns benchmark results into the printed table. Targets are informational:
 * PASS/MISS is shown, never enforced, because a noisy machine must not turn a
 * benchmark run into a failed build.
 */
import type { MemoryResult } from "./memory.ts";
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

export function throughputRows(cases: ThroughputCase[], targets: Record<number, Target>): Row[] {
  const rows: Row[] = [];
  for (const c of cases) {
    const target = targets[c.concurrency];
    const r = c.vm.perSecond / c.baseline.perSecond;
    rows.push({
      metric: `vmFetch req/s, ${c.label}`,
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
