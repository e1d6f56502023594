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
 *   trustedProxies          addresses or CIDRs of reverse proxies (AGENTVM_TRUSTED_PROXIES,
 *                           comma-separated; none by default). Only for connections from these
 *                           is X-Forwarded-For read, to count maxConnectionsPerClient per client
 *                           behind the proxy instead of for the proxy as one client.
 */
import { BlockList, isIP } from "node:net";
import { invalidArgument } from "../errors.ts";
import { describe, expectKnownKeys, expectObject } from "../validate.ts";

export interface ServerLimits {
  maxBodyBytes: number;
  maxHeaderBytes: number;
  maxHeadersCount: number;
  maxConnectionsPerClient: number;
  maxVmsPerDefinition: number;
  /** Reverse proxies whose X-Forwarded-For names the client (addresses or CIDRs); empty: the header is never read. */
  trustedProxies: readonly string[];
}

type CountLimit = Exclude<keyof ServerLimits, "trustedProxies">;

export const DEFAULT_LIMITS: Readonly<ServerLimits> = Object.freeze({
  maxBodyBytes: 32 * 1024 * 1024,
  maxHeaderBytes: 16 * 1024,
  maxHeadersCount: 100,
  maxConnectionsPerClient: 512,
  maxVmsPerDefinition: 10_000,
  trustedProxies: Object.freeze([]) as readonly string[],
});

const COUNT_LIMITS: readonly CountLimit[] = ["maxBodyBytes", "maxHeaderBytes", "maxHeadersCount", "maxConnectionsPerClient", "maxVmsPerDefinition"];

const ENV: Partial<Record<keyof ServerLimits, string>> = {
  maxBodyBytes: "AGENTVM_MAX_BODY_BYTES",
  maxHeaderBytes: "AGENTVM_MAX_HEADER_BYTES",
  maxConnectionsPerClient: "AGENTVM_MAX_CONNECTIONS_PER_CLIENT",
  maxVmsPerDefinition: "AGENTVM_MAX_VMS_PER_DEFINITION",
  trustedProxies: "AGENTVM_TRUSTED_PROXIES",
};

/** Smallest sensible value of each: below these the server could not serve its own client. */
const MINIMUM: Record<CountLimit, number> = { maxBodyBytes: 1024, maxHeaderBytes: 1024, maxHeadersCount: 8, maxConnectionsPerClient: 1, maxVmsPerDefinition: 1 };

/**
 * `legacyMaxBodyBytes`: start({ maxBodyBytes }), accepted as before; `limits.maxBodyBytes` wins.
 */
export function parseServerLimits(value: unknown, env: NodeJS.ProcessEnv = process.env, legacyMaxBodyBytes?: unknown): ServerLimits {
  const given = value === undefined ? {} : expectObject("start options.limits", value);
  expectKnownKeys("start options.limits", given, Object.keys(DEFAULT_LIMITS));
  const out = { ...DEFAULT_LIMITS };
  for (const key of COUNT_LIMITS) {
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
  out.trustedProxies = parseTrustedProxies(given.trustedProxies, env.AGENTVM_TRUSTED_PROXIES);
  return out;
}

/** Addresses (`10.0.0.5`, `::1`) and CIDRs (`10.0.1.0/24`): from the option (an array) or the variable (comma-separated). */
function parseTrustedProxies(value: unknown, envText: string | undefined): readonly string[] {
  const fromOption = value !== undefined;
  const where = fromOption ? "start options.limits.trustedProxies" : "AGENTVM_TRUSTED_PROXIES";
  let entries: unknown[];
  if (fromOption) {
    if (!Array.isArray(value)) throw invalidArgument(`${where} must be an array of addresses or CIDRs (e.g. ["10.0.0.5", "10.0.1.0/24"]), got ${describe(value)}`);
    entries = value;
  } else entries = envText === undefined || envText.trim() === "" ? [] : envText.split(",").map((entry) => entry.trim());
  for (const entry of entries) {
    if (typeof entry !== "string" || parseProxyEntry(entry) === undefined) {
      throw invalidArgument(`${where}: ${describe(entry)} is not an IP address or a CIDR such as 10.0.1.0/24`);
    }
  }
  return Object.freeze([...(entries as string[])]);
}

function parseProxyEntry(entry: string): { address: string; family: "ipv4" | "ipv6"; prefix: number } | undefined {
  const [address = "", prefixText, extra] = entry.split("/");
  const version = isIP(address);
  if (version === 0 || extra !== undefined) return undefined;
  const bits = version === 4 ? 32 : 128;
  const prefix = prefixText === undefined ? bits : /^\d{1,3}$/.test(prefixText) ? Number(prefixText) : NaN;
  if (!(prefix >= 0 && prefix <= bits)) return undefined;
  return { address, family: version === 4 ? "ipv4" : "ipv6", prefix };
}

/** The trusted proxies as a set to check socket addresses against. */
export function trustedProxySet(entries: readonly string[]): BlockList {
  const list = new BlockList();
  for (const entry of entries) {
    const parsed = parseProxyEntry(entry)!;
    list.addSubnet(parsed.address, parsed.prefix, parsed.family);
  }
  return list;
}
