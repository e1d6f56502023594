/**
 * The network policy (DESIGN §3 "Network policy", §4 layer 1): which
 * destinations outside the VM a guest may reach, and how.
 *
 * Flow: a request is normalized to { operation, host, port, address? } → the
 * policy answers { allow, rule } → a denial becomes EACCES naming the operation,
 * the destination and the rule. Order, stated once: a matching deny rule beats
 * any allow rule; then a matching allow rule; then the default (deny unless
 * configured). The egress floor is applied after, by egress.ts.
 *
 * The VM's own loopback never reaches this file: it is always allowed.
 */
import { BlockList, isIP } from "node:net";
import { invalidArgument } from "../errors.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";

export type Operation = "connect" | "dns" | "listen";

/** The `permissions.network` config, as users write it. */
export type NetworkPermission =
  | "allow"
  | "deny"
  | {
      default?: "allow" | "deny";
      rules: readonly NetworkRule[];
    };

export interface NetworkRule {
  mode: "allow" | "deny";
  /** Default ["*"]. `fetch` and `http` are aliases of `connect`. */
  operations?: readonly ("connect" | "fetch" | "http" | "dns" | "listen" | "*")[];
  /** Default ["*"]. `host`, `*.suffix`, `host:443`, `host:8000-9000`, an IP, a CIDR, `*`. */
  patterns?: readonly string[];
}
type Mode = "allow" | "deny";

const OPERATION_NAMES: Record<string, Operation | "*"> = { connect: "connect", fetch: "connect", http: "connect", dns: "dns", listen: "listen", "*": "*" };

type HostMatcher =
  | { kind: "any" }
  | { kind: "exact"; name: string }
  | { kind: "suffix"; suffix: string }
  | { kind: "address"; list: BlockList; text: string };

interface Pattern {
  text: string;
  host: HostMatcher;
  ports: [number, number] | undefined;
}

interface Rule {
  index: number;
  mode: Mode;
  operations: ReadonlySet<Operation | "*">;
  patterns: Pattern[];
}

export interface NetworkPolicy {
  readonly default: Mode;
  readonly rules: readonly Rule[];
}

export interface Destination {
  operation: Operation;
  /** The name or address the guest asked for, lowercased. */
  host: string;
  port?: number;
  /** The resolved address, when there is one. */
  address?: string;
}

export interface Decision {
  allow: boolean;
  /** e.g. `rules[1] (allow connect api.example.com)`, or `default (deny)`. */
  rule: string;
}

export const DENY_ALL: NetworkPolicy = { default: "deny", rules: [] };

export function parseNetworkPolicy(value: unknown, field = "permissions.network"): NetworkPolicy {
  if (value === undefined || value === "deny") return DENY_ALL;
  if (value === "allow") return { default: "allow", rules: [] };
  const config = expectObject(field, value);
  expectKnownKeys(field, config, ["default", "rules"]);
  const fallback = config.default ?? "deny";
  if (fallback !== "allow" && fallback !== "deny") throw invalidArgument(`${field}.default must be "allow" or "deny", got ${describe(fallback)}`);
  if (!Array.isArray(config.rules)) throw invalidArgument(`${field}.rules must be an array of rules, got ${describe(config.rules)}`);
  const rules = config.rules.map((raw, index) => parseRule(raw, index, `${field}.rules[${index}]`));
  return { default: fallback, rules };
}

function parseRule(raw: unknown, index: number, field: string): Rule {
  const rule = expectObject(field, raw);
  expectKnownKeys(field, rule, ["mode", "operations", "patterns"]);
  if (rule.mode !== "allow" && rule.mode !== "deny") throw invalidArgument(`${field}.mode must be "allow" or "deny", got ${describe(rule.mode)}`);
  const operations = listOf(rule.operations ?? ["*"], `${field}.operations`).map((name, i) => {
    const operation = OPERATION_NAMES[name.toLowerCase()];
    if (!operation) throw invalidArgument(`${field}.operations[${i}] ${JSON.stringify(name)} is not an operation; use connect (or fetch/http), dns, listen or *`);
    return operation;
  });
  const patterns = listOf(rule.patterns ?? ["*"], `${field}.patterns`).map((text, i) => parsePattern(text, `${field}.patterns[${i}]`));
  return { index, mode: rule.mode, operations: new Set(operations), patterns };
}

function listOf(value: unknown, field: string): string[] {
  if (!Array.isArray(value) || value.length === 0) throw invalidArgument(`${field} must be a non-empty array of strings, got ${describe(value)}`);
  value.forEach((item, i) => {
    if (typeof item !== "string" || item.trim() === "") throw invalidArgument(`${field}[${i}] must be a non-empty string, got ${describe(item)}`);
  });
  return value as string[];
}

/** `*`, `host`, `*.suffix`, `host:443`, `host:8000-9000`, an IP, `[v6]:port`, a CIDR. */
export function parsePattern(raw: string, field = "pattern"): Pattern {
  const text = raw.trim().toLowerCase();
  let hostPart = text;
  let portPart: string | undefined;
  const bracketed = /^\[([^\]]+)\](?::(.+))?$/.exec(text);
  if (bracketed) {
    hostPart = bracketed[1]!;
    portPart = bracketed[2];
  } else if (!isIP(text) && !text.includes("/") && text.includes(":")) {
    const at = text.lastIndexOf(":");
    hostPart = text.slice(0, at);
    portPart = text.slice(at + 1);
  }
  const ports = portPart === undefined || portPart === "*" ? undefined : parsePorts(portPart, field, raw);
  return { text, host: parseHost(hostPart, field, raw), ports };
}

function parsePorts(text: string, field: string, raw: string): [number, number] {
  const match = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text);
  const low = Number(match?.[1]);
  const high = Number(match?.[2] ?? match?.[1]);
  if (!match || low < 1 || high > 65535 || low > high) {
    throw invalidArgument(`${field} ${JSON.stringify(raw)}: the port must be 1-65535 or a range like 8000-9000`);
  }
  return [low, high];
}

function parseHost(text: string, field: string, raw: string): HostMatcher {
  if (text === "*" || text === "") return { kind: "any" };
  if (text.includes("/")) {
    const [base, bitsText] = text.split("/") as [string, string];
    const family = isIP(base);
    const bits = Number(bitsText);
    if (!family || !/^\d{1,3}$/.test(bitsText) || bits > (family === 4 ? 32 : 128)) {
      throw invalidArgument(`${field} ${JSON.stringify(raw)} is not a valid CIDR (e.g. 10.0.0.0/8 or fd00::/8)`);
    }
    const list = new BlockList();
    list.addSubnet(base, bits, family === 4 ? "ipv4" : "ipv6");
    return { kind: "address", list, text };
  }
  const family = isIP(text);
  if (family) {
    const list = new BlockList();
    list.addAddress(text, family === 4 ? "ipv4" : "ipv6");
    return { kind: "address", list, text };
  }
  if (text.startsWith("*.")) {
    const suffix = text.slice(1);
    if (!isHostName(suffix.slice(1))) throw invalidArgument(`${field} ${JSON.stringify(raw)} is not a valid wildcard host (e.g. *.example.com)`);
    return { kind: "suffix", suffix };
  }
  if (!isHostName(text)) throw invalidArgument(`${field} ${JSON.stringify(raw)} is not a host name, IP, CIDR or *`);
  return { kind: "exact", name: text };
}

function isHostName(text: string): boolean {
  return text.length <= 253 && /^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/.test(text);
}

/** IPv4-mapped IPv6 (::ffff:10.0.0.1) is checked as the IPv4 address it is. */
export function canonicalAddress(address: string): { address: string; family: "ipv4" | "ipv6" } | undefined {
  const bare = address.replace(/^\[|\]$/g, "").toLowerCase();
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(bare);
  if (mapped) return { address: mapped[1]!, family: "ipv4" };
  const family = isIP(bare);
  if (!family) return undefined;
  return { address: bare, family: family === 4 ? "ipv4" : "ipv6" };
}

function matchesHost(matcher: HostMatcher, destination: Destination): boolean {
  switch (matcher.kind) {
    case "any":
      return true;
    case "exact":
      return destination.host === matcher.name;
    case "suffix":
      return destination.host.endsWith(matcher.suffix);
    case "address": {
      for (const candidate of [destination.address, destination.host]) {
        const canonical = candidate === undefined ? undefined : canonicalAddress(candidate);
        if (canonical && matcher.list.check(canonical.address, canonical.family)) return true;
      }
      return false;
    }
  }
}

function matches(rule: Rule, destination: Destination): Pattern | undefined {
  if (!rule.operations.has("*") && !rule.operations.has(destination.operation)) return undefined;
  return rule.patterns.find((pattern) => {
    if (pattern.ports && (destination.port === undefined || destination.port < pattern.ports[0] || destination.port > pattern.ports[1])) return false;
    return matchesHost(pattern.host, destination);
  });
}

function describeRule(rule: Rule, pattern: Pattern): string {
  return `rules[${rule.index}] (${rule.mode} ${[...rule.operations].join(",")} ${pattern.text})`;
}

export function decide(policy: NetworkPolicy, destination: Destination): Decision {
  let allowedBy: { rule: Rule; pattern: Pattern } | undefined;
  for (const rule of policy.rules) {
    const pattern = matches(rule, destination);
    if (!pattern) continue;
    if (rule.mode === "deny") return { allow: false, rule: describeRule(rule, pattern) };
    allowedBy ??= { rule, pattern };
  }
  if (allowedBy) return { allow: true, rule: describeRule(allowedBy.rule, allowedBy.pattern) };
  return { allow: policy.default === "allow", rule: `default (${policy.default})` };
}

/**
 * True when an allow rule names this destination's address (an IP or a CIDR
 * narrower than /0) — the only thing that lifts the egress floor for it.
 */
export function namesAddressExplicitly(policy: NetworkPolicy, destination: Destination): boolean {
  return policy.rules.some((rule) => {
    if (rule.mode !== "allow") return false;
    // Only the rule's address patterns count, even when another of its patterns (a name) matches first.
    const naming = rule.patterns.filter((pattern) => pattern.host.kind === "address" && !/\/0$/.test(pattern.text));
    return naming.length > 0 && matches({ ...rule, patterns: naming }, destination) !== undefined;
  });
}

/**
 * True when some allow rule for `operation` names an IP or CIDR that could hold
 * this port: only then can a name the rules refuse be allowed once resolved.
 */
export function mayAllowByAddress(policy: NetworkPolicy, operation: Operation, port?: number): boolean {
  return policy.rules.some(
    (rule) =>
      rule.mode === "allow" &&
      (rule.operations.has("*") || rule.operations.has(operation)) &&
      rule.patterns.some((pattern) => pattern.host.kind === "address" && (!pattern.ports || (port !== undefined && port >= pattern.ports[0] && port <= pattern.ports[1]))),
  );
}

/** True when an allow rule names `host` exactly with a port range (holding `port`, when given). */
export function namesHostAndPort(policy: NetworkPolicy, host: string, port?: number): boolean {
  return policy.rules.some(
    (rule) =>
      rule.mode === "allow" &&
      (rule.operations.has("*") || rule.operations.has("connect")) &&
      rule.patterns.some(
        (pattern) =>
          pattern.host.kind === "exact" &&
          pattern.host.name === host &&
          pattern.ports !== undefined &&
          (port === undefined || (port >= pattern.ports[0] && port <= pattern.ports[1])),
      ),
  );
}
