/**
 * Which ports guests may bind (DESIGN §3 "Listen policy"). Validated once when the
 * VM is defined; decisions are pure functions of the normalized policy.
 */
import { AgentVmError, invalidArgument } from "../errors.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";
import { decide, type NetworkPolicy } from "./network-policy.ts";

export interface ListenConfig {
  portMin?: number;
  portMax?: number;
  allowPrivileged?: boolean;
}

export interface ListenPolicy {
  readonly portMin: number;
  readonly portMax: number;
  readonly allowPrivileged: boolean;
}

const PRIVILEGED_BELOW = 1024;

export function parseListenPolicy(value: unknown, field = "listen"): ListenPolicy {
  if (value === undefined) return { portMin: 1, portMax: 65535, allowPrivileged: false };
  const config = expectObject(field, value);
  expectKnownKeys(field, config, ["portMin", "portMax", "allowPrivileged"]);
  const port = (key: "portMin" | "portMax", fallback: number): number => {
    const raw = config[key];
    if (raw === undefined) return fallback;
    if (typeof raw !== "number" || !Number.isInteger(raw) || raw < 1 || raw > 65535) {
      throw invalidArgument(`${field}.${key} must be an integer from 1 to 65535, got ${describe(raw)}`);
    }
    return raw;
  };
  const portMin = port("portMin", 1);
  const portMax = port("portMax", 65535);
  if (portMin > portMax) {
    throw invalidArgument(`${field}.portMin (${portMin}) must not be greater than ${field}.portMax (${portMax})`);
  }
  const allowPrivileged = config.allowPrivileged ?? false;
  if (typeof allowPrivileged !== "boolean") {
    throw invalidArgument(`${field}.allowPrivileged must be a boolean, got ${describe(allowPrivileged)}`);
  }
  return { portMin, portMax, allowPrivileged };
}

/** Throws EACCES when the policy forbids binding `port` (a concrete port, not 0). */
export function checkListenPort(policy: ListenPolicy, port: number): void {
  if (port < PRIVILEGED_BELOW && !policy.allowPrivileged) {
    throw new AgentVmError(
      "EACCES",
      `listen on port ${port}: ports below ${PRIVILEGED_BELOW} are privileged; use a port from ${autoRange(policy).join(" to ")} or set listen.allowPrivileged`,
    );
  }
  if (port < policy.portMin || port > policy.portMax) {
    throw new AgentVmError(
      "EACCES",
      `listen on port ${port}: outside the VM's listen range ${policy.portMin}-${policy.portMax} (listen.portMin/portMax)`,
    );
  }
}

/** The range `listen(0)` allocates from. */
export function autoRange(policy: ListenPolicy): [number, number] {
  const low = Math.max(policy.portMin, policy.allowPrivileged ? 1 : PRIVILEGED_BELOW);
  return [low, policy.portMax];
}

/**
 * The whole listen decision as data, for the Node preload in the VM: ranges of
 * refused ports, each with its message (`{port}` stands for the port asked
 * for). Privileged ports and the range hold for every program through the
 * VM's kernel settings; this gives Node programs the same answer with the
 * rule named, and adds the network policy's listen rules.
 */
export function listenDenials(listen: ListenPolicy, network: NetworkPolicy): [from: number, to: number, message: string][] {
  const out: [number, number, string][] = [];
  const add = (from: number, to: number, message: string) => {
    const last = out.at(-1);
    if (last && last[2] === message && last[1] === from - 1) last[1] = to;
    else if (from <= to) out.push([from, to, message]);
  };
  const messageOf = (port: number): string | undefined => {
    try {
      checkListenPort(listen, port);
    } catch (error) {
      return (error as Error).message.replace(`port ${port}`, "port {port}");
    }
    if (!hasListenRules) return undefined;
    const decision = decide(network, { operation: "listen", host: "localhost", port });
    return !decision.allow && decision.rule.startsWith("rules[") ? `listen on port {port}: denied by ${decision.rule} of permissions.network` : undefined;
  };
  const hasListenRules = network.rules.some((rule) => rule.operations.has("listen") || rule.operations.has("*"));
  if (!hasListenRules) {
    // Without listen rules the answer only changes at these ports: one check per stretch.
    const bounds = [...new Set([1, PRIVILEGED_BELOW, listen.portMin, listen.portMax + 1, 65536])].sort((x, y) => x - y);
    for (const [i, from] of bounds.slice(0, -1).entries()) {
      const message = messageOf(from);
      if (message) add(from, bounds[i + 1]! - 1, message);
    }
    return out;
  }
  for (let port = 1; port <= 65535; port++) {
    const message = messageOf(port);
    if (message) add(port, port, message);
  }
  return out;
}
