/**
 * `agentOS(config)` — the VM definition a registry serves. Both seed shapes are
 * accepted (`agentOS({ software, permissions, listen, preview })` and
 * `agentOs({ options: { software }, preview })`); everything is validated here,
 * when the VM is defined, so a typo fails at start-up naming the field instead
 * of surfacing later inside a guest.
 */
import { invalidArgument } from "../errors.ts";
import { parseListenPolicy, type ListenConfig, type ListenPolicy } from "../policy/listen-policy.ts";
import { describe, expectKnownKeys, expectObject, expectString, expectStringArray, expectStringRecord } from "../validate.ts";
import { parsePreviewConfig, type PreviewConfig, type ResolvedPreviewConfig } from "../net/previews.ts";
import { parseHosts, parseLimits, type PermissionsConfig, type VmLimits } from "../vm.ts";
import { parseNetworkPolicy } from "../policy/network-policy.ts";
import { parseSoftware, type SoftwareDescriptor, type SoftwareEntry } from "../image/software.ts";

export type { PreviewConfig };

/** A `software` entry: one from `agentvm/software`, or agentOS's own software packages (matched by package name). */
export type SoftwarePackage = SoftwareEntry;

interface VmOptions {
  software?: SoftwarePackage[];
  permissions?: PermissionsConfig;
  listen?: ListenConfig;
  limits?: VmLimits;
  /** Like /etc/hosts for the VM: name → IP address. */
  hosts?: Record<string, string>;
}

export interface AgentOsConfig extends VmOptions {
  preview?: PreviewConfig;
  /** RivetKit's shape: VM options nested under `options`. */
  options?: VmOptions;
  /** A VM with no processes, connections or requests sleeps after this long (ms). Default 300000. */
  sleepAfterMs?: number;
  /** Bounds on a VM's life (both unset by default). */
  lifecycle?: LifecycleConfig;
  /** Programs started every time a VM of this definition wakes (a dev server its previews show). */
  services?: ServiceConfig[];
}

export interface LifecycleConfig {
  /**
   * A VM is destroyed (processes, files, preview URLs, rows) this long after it
   * was created; its key then starts a fresh VM.
   */
  maxLifetimeSeconds?: number;
  /**
   * A VM with no request, event stream or preview in flight for this long sleeps
   * even while its processes run (they stop; restartOnWake ones start again on
   * the next wake). Without it, running processes keep a VM awake.
   */
  idleTimeoutSeconds?: number;
}

export interface ServiceConfig {
  command: string;
  args?: string[];
  cwd?: string;
  env?: Record<string, string>;
}

export interface VmDefinition {
  readonly kind: "agentvm.vm";
  readonly software: readonly SoftwareDescriptor[];
  readonly permissions: PermissionsConfig | undefined;
  readonly listen: ListenPolicy;
  readonly listenConfig: ListenConfig | undefined;
  readonly limits: VmLimits | undefined;
  readonly hosts: Record<string, string> | undefined;
  readonly preview: ResolvedPreviewConfig;
  readonly sleepAfterMs: number;
  readonly lifecycle: Readonly<LifecycleConfig>;
  readonly services: readonly Readonly<ServiceConfig>[];
}

const TOP_LEVEL = ["software", "permissions", "listen", "preview", "options", "limits", "sleepAfterMs", "hosts", "lifecycle", "services"];
/** Ten years: a lifetime or timeout longer than that is a mistake (and would overflow timers). */
const MAX_LIFECYCLE_SECONDS = 10 * 365 * 86_400;
const VM_OPTION_KEYS = ["software", "permissions", "listen", "limits", "hosts"];

export function agentOS(config: AgentOsConfig = {}): VmDefinition {
  const top = expectObject("agentOS config", config);
  expectKnownKeys("config", top, TOP_LEVEL);
  const nested = top.options === undefined ? {} : expectObject("config.options", top.options);
  expectKnownKeys("config.options", nested, VM_OPTION_KEYS);
  const pick = (key: string): unknown => {
    if (top[key] !== undefined && nested[key] !== undefined) {
      throw invalidArgument(`config.${key} and config.options.${key} are both set; use one of them`);
    }
    return top[key] ?? nested[key];
  };
  const where = (key: string) => (top[key] !== undefined ? `config.${key}` : `config.options.${key}`);

  const software = parseSoftware(pick("software") ?? [], where("software"));
  const permissions = pick("permissions");
  if (permissions !== undefined) {
    const record = expectObject(where("permissions"), permissions);
    expectKnownKeys(where("permissions"), record, ["network"]);
    parseNetworkPolicy(record.network, "permissions.network");
  }
  if (pick("hosts") !== undefined) parseHosts(pick("hosts"));
  const listenConfig = pick("listen") as ListenConfig | undefined;
  const listen = parseListenPolicy(listenConfig, where("listen"));
  const limits = pick("limits");
  if (limits !== undefined) parseLimits(expectObject(where("limits"), limits));

  const sleepAfterMs = top.sleepAfterMs ?? 300_000;
  if (typeof sleepAfterMs !== "number" || !Number.isFinite(sleepAfterMs) || sleepAfterMs < 0) {
    throw invalidArgument(`config.sleepAfterMs must be a number of milliseconds ≥ 0, got ${describe(sleepAfterMs)}`);
  }

  const lifecycle = parseLifecycle(top.lifecycle);
  const services = parseServices(top.services);

  return Object.freeze({
    kind: "agentvm.vm" as const,
    lifecycle,
    services,
    software: Object.freeze([...software]),
    permissions: permissions as PermissionsConfig | undefined,
    listen,
    listenConfig,
    limits: limits as VmLimits | undefined,
    hosts: pick("hosts") as Record<string, string> | undefined,
    preview: parsePreviewConfig(top.preview, "preview"),
    sleepAfterMs,
  });
}

function parseLifecycle(value: unknown): Readonly<LifecycleConfig> {
  if (value === undefined) return Object.freeze({});
  const config = expectObject("config.lifecycle", value);
  expectKnownKeys("config.lifecycle", config, ["maxLifetimeSeconds", "idleTimeoutSeconds"]);
  const out: LifecycleConfig = {};
  for (const key of ["maxLifetimeSeconds", "idleTimeoutSeconds"] as const) {
    const raw = config[key];
    if (raw === undefined) continue;
    if (typeof raw !== "number" || !Number.isFinite(raw) || raw <= 0 || raw > MAX_LIFECYCLE_SECONDS) {
      throw invalidArgument(`config.lifecycle.${key} must be a number of seconds > 0 and at most ${MAX_LIFECYCLE_SECONDS}, got ${describe(raw)}`);
    }
    out[key] = raw;
  }
  return Object.freeze(out);
}

function parseServices(value: unknown): readonly Readonly<ServiceConfig>[] {
  if (value === undefined) return Object.freeze([]);
  if (!Array.isArray(value)) throw invalidArgument(`config.services must be an array of { command, args?, cwd?, env? }, got ${describe(value)}`);
  return Object.freeze(
    value.map((entry, i) => {
      const where = `config.services[${i}]`;
      const service = expectObject(where, entry);
      expectKnownKeys(where, service, ["command", "args", "cwd", "env"]);
      return Object.freeze({
        command: expectString(`${where}.command`, service.command, { nonEmpty: true, max: 4096 }),
        ...(service.args !== undefined ? { args: expectStringArray(`${where}.args`, service.args) } : {}),
        ...(service.cwd !== undefined ? { cwd: expectString(`${where}.cwd`, service.cwd, { nonEmpty: true, max: 4096 }) } : {}),
        ...(service.env !== undefined ? { env: expectStringRecord(`${where}.env`, service.env) } : {}),
      });
    }),
  );
}

/** The same function under the name RivetKit's page uses. */
export const agentOs = agentOS;

export function isVmDefinition(value: unknown): value is VmDefinition {
  return typeof value === "object" && value !== null && (value as { kind?: unknown }).kind === "agentvm.vm";
}
