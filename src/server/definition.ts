/**
 * `agentOS(config)` — the VM definition a registry serves. Both seed shapes are
 * accepted (`agentOS({ software, permissions, listen, preview })` and
 * `agentOs({ options: { software }, preview })`); everything is validated here,
 * when the VM is defined, so a typo fails at start-up naming the field instead
 * of surfacing later inside a guest.
 */
import { invalidArgument } from "../errors.ts";
import { parseListenPolicy, type ListenConfig, type ListenPolicy } from "../policy/listen-policy.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";
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
}

const TOP_LEVEL = ["software", "permissions", "listen", "preview", "options", "limits", "sleepAfterMs", "hosts"];
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

  return Object.freeze({
    kind: "agentvm.vm" as const,
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

/** The same function under the name RivetKit's page uses. */
export const agentOs = agentOS;

export function isVmDefinition(value: unknown): value is VmDefinition {
  return typeof value === "object" && value !== null && (value as { kind?: unknown }).kind === "agentvm.vm";
}
