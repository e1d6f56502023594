/**
 * Turns benchmark results into the printed table: one row per number, the
 * agentvm value beside its baseline from the same run, their ratio, the
 * DESIGN §5 target and PASS/MISS. Targets are informational: a noisy machine
 * must not turn a benchmark run into a failed build.
 */
import type { ExecResult } from "./exec.ts";
import type { ImageResult } from "./image.ts";
import type { MemoryResult } from "./memory.ts";
import type { DownloadResult, PreviewsResult } from "./previews.ts";
import type { ProcMemory } from "./procfs.ts";
import type { ServerActionsResult } from "./server-actions.ts";
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

/** `min-ratio`: agentvm ÷ baseline at least `limit`; `max-value`: agentvm's value at most `limit`. */
export interface Target {
  kind: "min-ratio" | "max-value";
  limit: number;
  unit?: string;
}

export function verdict(value: number, target: Target): "PASS" | "MISS" {
  if (!Number.isFinite(value)) return "MISS";
  const ok = target.kind === "min-ratio" ? value >= target.limit : value <= target.limit;
  return ok ? "PASS" : "MISS";
}

const EMPTY = "—";

export function int(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toLocaleString("en-US") : EMPTY;
}
export function fixed(value: number, digits = 1): string {
  return Number.isFinite(value) ? value.toFixed(digits) : EMPTY;
}
function ratioText(value: number, baseline: number): string {
  return baseline > 0 && Number.isFinite(value) && Number.isFinite(baseline) ? fixed(value / baseline, 2) : EMPTY;
}
function targetText(target: Target): string {
  if (target.kind === "min-ratio") return `ratio ≥ ${fixed(target.limit, 2)}`;
  return target.limit === 0 ? "= 0" : `≤ ${target.limit}${target.unit ?? ""}`;
}

/** A row; with a target, `checked` is the number the target applies to (the ratio for min-ratio targets). */
function row(metric: string, agentvm: string, baseline = EMPTY, ratio = EMPTY, target?: Target, checked = Number.NaN): Row {
  return { metric, agentvm, baseline, ratio, target: target ? targetText(target) : EMPTY, result: target ? verdict(checked, target) : "" };
}

export function throughputRows(name: string, cases: ThroughputCase[], targets: Record<number, Target>): Row[] {
  return cases.flatMap((c) => {
    const ratio = c.vm.perSecond / c.baseline.perSecond;
    const target = targets[c.concurrency];
    return [
      row(`${name} req/s, ${c.label}`, int(c.vm.perSecond), int(c.baseline.perSecond), fixed(ratio, 2), target, ratio),
      row(`  p50 latency ms`, fixed(c.vm.p50Ms, 2), fixed(c.baseline.p50Ms, 2), ratioText(c.vm.p50Ms, c.baseline.p50Ms)),
    ];
  });
}

/**
 * Preview gateway against nginx as a proxy: both were measured against the
 * same direct baseline in alternating rounds, so their ratios to it compare.
 */
export function nginxRows(previews: PreviewsResult, target: Target): Row[] {
  if (previews.nginx.length === 0) return [{ ...row("preview vs nginx proxy", "skipped", EMPTY, EMPTY, target), result: "SKIP" }];
  return previews.nginx.map((nginx) => {
    const preview = previews.throughput.find((c) => c.concurrency === nginx.concurrency)!;
    const ratio = preview.vm.perSecond / preview.baseline.perSecond / (nginx.vm.perSecond / nginx.baseline.perSecond);
    return row(`preview vs nginx proxy req/s, ${nginx.label}`, int(preview.vm.perSecond), `${int(nginx.vm.perSecond)} nginx`, fixed(ratio, 2), target, ratio);
  });
}

export function downloadRows(previews: PreviewsResult, targets: { ratio: Target; rssGrowthMb: Target }): Row[] {
  const { baseline, preview, vmFetchStream, vmFetchReadable } = previews.download;
  const gib = ((previews.downloadChunks * 64) / 1024 / 1024).toFixed(2).replace(/\.00$/, "");
  const one = (name: string, download: DownloadResult): Row[] => {
    const ratio = download.mbPerSecond / baseline.mbPerSecond;
    return [
      row(`${gib} GiB via ${name}, MB/s`, int(download.mbPerSecond), int(baseline.mbPerSecond), fixed(ratio, 2), targets.ratio, ratio),
      row(`  serving process RSS growth MB (peak)`, fixed(download.peakGrowthMb), fixed(baseline.peakGrowthMb), EMPTY, targets.rssGrowthMb, download.peakGrowthMb),
    ];
  };
  return [...one("client vmFetchStream", vmFetchStream), ...one("vm.vmFetchReadable", vmFetchReadable), ...one("preview", preview)];
}

/** Baseline column: the same script spawned on the host. */
export function spawnRows(warm: SpawnSummary, cold: SpawnSummary, host: SpawnSummary, targets: { warm: Target; cold: Target }): Row[] {
  return [
    row(`spawn → first response p50 ms, warm`, fixed(warm.p50), fixed(host.p50), ratioText(warm.p50, host.p50), targets.warm, warm.p50),
    row(`  p95 ms, warm (${warm.iterations} spawns, one VM)`, fixed(warm.p95), fixed(host.p95), ratioText(warm.p95, host.p95)),
    row(`spawn → first response p50 ms, cold`, fixed(cold.p50), fixed(host.p50), ratioText(cold.p50, host.p50), targets.cold, cold.p50),
    row(`  p95 ms, cold (${cold.iterations} new VMs)`, fixed(cold.p95), fixed(host.p95), ratioText(cold.p95, host.p95)),
  ];
}

export function serverRows(server: ServerActionsResult, targets: { createP50Ms: Target; sandboxes: Target }): Row[] {
  const { writeFile, exists, create, idle } = server;
  const both = (p50: number, p95: number) => `${fixed(p50, 2)} / ${fixed(p95, 2)}`;
  return [
    row(`VM create + first action p50 ms`, fixed(create.vm.p50, 2), fixed(create.baseline.p50, 2), ratioText(create.vm.p50, create.baseline.p50), targets.createP50Ms, create.vm.p50),
    row(`  p95 ms (${create.vms} new keys)`, fixed(create.vm.p95, 2), fixed(create.baseline.p95, 2), ratioText(create.vm.p95, create.baseline.p95)),
    row(`  sandboxes started by creating them`, int(create.sandboxes), EMPTY, EMPTY, targets.sandboxes, create.sandboxes),
    row(`action writeFile 100 B, p50 / p95 ms`, both(writeFile.vm.p50, writeFile.vm.p95), both(writeFile.baseline.p50, writeFile.baseline.p95), ratioText(writeFile.vm.p50, writeFile.baseline.p50)),
    row(`action exists, p50 / p95 ms`, both(exists.vm.p50, exists.vm.p95), both(exists.baseline.p50, exists.baseline.p95), ratioText(exists.vm.p50, exists.baseline.p50)),
    row(`idle VMs (${idle.vms}, one writeFile each): sandboxes`, int(idle.sandboxes), EMPTY, EMPTY, targets.sandboxes, idle.sandboxes),
    row(`  server RSS growth KB per idle VM`, int(idle.perVmKb)),
  ];
}

export function memoryRows(memory: MemoryResult, baseline: ProcMemory | undefined, target: Target): Row[] {
  const basePrivate = baseline ? baseline.privateKb / 1024 : Number.NaN;
  const basePss = baseline ? baseline.pssKb / 1024 : Number.NaN;
  return [
    row(`private MB per VM, one node server, incl. init`, fixed(memory.privateMb), fixed(basePrivate), ratioText(memory.privateMb, basePrivate), target, memory.privateMb),
    row(`  of which init`, fixed(memory.initPrivateMb)),
    row(`  of which the server's node`, fixed(memory.programPrivateMb), fixed(basePrivate), ratioText(memory.programPrivateMb, basePrivate)),
    row(`  of which bubblewrap`, fixed(memory.bwrapPrivateMb)),
    row(`  Pss MB per VM`, fixed(memory.pssMb), fixed(basePss), ratioText(memory.pssMb, basePss)),
    row(`  host process RSS growth MB per VM`, fixed(memory.hostRssMb)),
  ];
}

export function imageRows(image: ImageResult, exec: ExecResult): Row[] {
  return [
    row(`image: ensureImage() ms, ${image.mode}`, int(image.ms)),
    row(`image: size MB (files, hard links once)`, int(image.sizeMb)),
    row(`exec sh -c true p50 ms, warm VM`, fixed(exec.vm.p50, 2), fixed(exec.baseline.p50, 2), ratioText(exec.vm.p50, exec.baseline.p50)),
    row(`  p95 ms`, fixed(exec.vm.p95, 2), fixed(exec.baseline.p95, 2), ratioText(exec.vm.p95, exec.baseline.p95)),
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
