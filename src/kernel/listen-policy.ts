/**
 * Which ports guests may bind (DESIGN §3 "Listen policy"). Validated once when the
 * VM is defined; decisions are pure functions of the normalized policy.
 */
import { AgentVmError, invalidArgument } from "../errors.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";

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
