/**
 * The server's caps on what one client can make it hold, parsed in one place
 * from `start({ limits })` and environment variables (options win). Each has a
 * finite default: a server started with none of them set is still bounded.
 *
 *   maxBodyBytes            action and token bodies (AGENTVM_MAX_BODY_BYTES, 32 MiB).
 *                           vmFetch and preview bodies stream and are not held.
 *   maxHeaderBytes          all request headers of one request (AGENTVM_MAX_HEADER_BYTES, 16 KiB);
 *                           Node's maxHeaderSize, answered with HEADERS_TOO_LARGE 431.
 *   maxHeadersCount         header lines read per request (100); Node drops the rest.
 *   maxConnectionsPerClient open connections from one client address, per listener
 *                           (AGENTVM_MAX_CONNECTIONS_PER_CLIENT, 512); TOO_MANY_CONNECTIONS 429.
 *   maxVmsPerDefinition     VMs (rows) one definition may have (AGENTVM_MAX_VMS_PER_DEFINITION,
 *                           10000); creating one more is TOO_MANY_VMS 507.
 */
import { invalidArgument } from "../errors.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";

export interface ServerLimits {
  maxBodyBytes: number;
  maxHeaderBytes: number;
  maxHeadersCount: number;
  maxConnectionsPerClient: number;
  maxVmsPerDefinition: number;
}

export const DEFAULT_LIMITS: Readonly<ServerLimits> = Object.freeze({
  maxBodyBytes: 32 * 1024 * 1024,
  maxHeaderBytes: 16 * 1024,
  maxHeadersCount: 100,
  maxConnectionsPerClient: 512,
  maxVmsPerDefinition: 10_000,
});

const ENV: Partial<Record<keyof ServerLimits, string>> = {
  maxBodyBytes: "AGENTVM_MAX_BODY_BYTES",
  maxHeaderBytes: "AGENTVM_MAX_HEADER_BYTES",
  maxConnectionsPerClient: "AGENTVM_MAX_CONNECTIONS_PER_CLIENT",
  maxVmsPerDefinition: "AGENTVM_MAX_VMS_PER_DEFINITION",
};

/** Smallest sensible value of each: below these the server could not serve its own client. */
const MINIMUM: Record<keyof ServerLimits, number> = { maxBodyBytes: 1024, maxHeaderBytes: 1024, maxHeadersCount: 8, maxConnectionsPerClient: 1, maxVmsPerDefinition: 1 };

/**
 * `legacyMaxBodyBytes`: start({ maxBodyBytes }), accepted as before; `limits.maxBodyBytes` wins.
 */
export function parseServerLimits(value: unknown, env: NodeJS.ProcessEnv = process.env, legacyMaxBodyBytes?: unknown): ServerLimits {
  const given = value === undefined ? {} : expectObject("start options.limits", value);
  expectKnownKeys("start options.limits", given, Object.keys(DEFAULT_LIMITS));
  const out = { ...DEFAULT_LIMITS };
  for (const key of Object.keys(DEFAULT_LIMITS) as (keyof ServerLimits)[]) {
    const envName = ENV[key];
    const envText = envName ? env[envName] : undefined;
    const raw = given[key] ?? (key === "maxBodyBytes" ? legacyMaxBodyBytes : undefined) ?? (envText !== undefined && envText !== "" ? Number(envText) : undefined);
    if (raw === undefined) continue;
    if (typeof raw !== "number" || !Number.isSafeInteger(raw) || raw < MINIMUM[key]) {
      const where = given[key] !== undefined ? `start options.limits.${key}` : key === "maxBodyBytes" && legacyMaxBodyBytes !== undefined ? "start options.maxBodyBytes" : envName!;
      throw invalidArgument(`${where} must be an integer ≥ ${MINIMUM[key]}, got ${describe(envText !== undefined && given[key] === undefined ? envText : raw)}`);
    }
    out[key] = raw;
  }
  return out;
}
