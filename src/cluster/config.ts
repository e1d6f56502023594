/**
 * The `agentvm` commands' options: parsed and validated here, once, so every
 * command fails the same way (INVALID_ARGUMENT naming the flag) before it starts
 * anything. Flags may also come from the environment (named beside each).
 */
import { isIP } from "node:net";
import { resolve } from "node:path";
import { invalidArgument } from "../errors.ts";

/** Engine ports: its gateway/API (clients and nodes), its peer API, its metrics. Not 6420/6421: those are agentvm's own. */
export const ENGINE_DEFAULT_PORT = 6500;
export const NODE_DEFAULT_PORT = 6430;
/** Every agentvm node joins the engine in its own pool, named after the node: that is what pins a VM to the node holding its files. */
export const NODE_POOL_PREFIX = "agentvm.";
/**
 * Where a node publishes its addresses: the metadata of a runner config that no
 * runner joins (a runner rewrites its own pool's config when it connects).
 */
export const NODE_ADDRESS_PREFIX = "agentvm-address.";
/**
 * Pegboard timeouts short enough that a restarted node's VMs answer within
 * seconds (DESIGN §6). Not the ping timeouts DESIGN §6 also lists
 * (`envoy_ping_timeout: 5000`, `envoy_eligible_threshold: 4000`): on a loaded
 * machine they drop live nodes whose pings run late, and each reconnect risks
 * the engine's actor-creation stall (docs/cluster.md, "Known engine issue").
 */
export const PEGBOARD_TIMEOUTS = {
  reschedule_backoff_max_exponent: 2,
  envoy_lost_threshold: 5000,
} as const;

export interface EngineOptions {
  host: string;
  port: number;
  dataDir: string;
  /** Admin token the engine requires; mandatory off loopback. */
  token: string | undefined;
  /**
   * Shared state for several engines (an HA engine): PostgreSQL for storage and
   * NATS for pub/sub instead of the file-system store in `dataDir`. Both or neither.
   */
  shared: SharedEngineState | undefined;
  /**
   * The address nodes and clients reach the engine at: the load balancer in
   * front of several engines. The engine answers it as its datacenter's URL, so
   * every engine on the same shared state must be given the same one.
   */
  publicUrl: string;
  /** Probes that the engine still creates actors and restarts it when it does not (src/cluster/engine-watchdog.ts); undefined when off. */
  watchdog: WatchdogOptions | undefined;
}

export interface WatchdogOptions {
  /** Time between the end of one probe and the start of the next. */
  intervalMs: number;
  /** A probe that takes longer has hung; two in a row restart the engine. */
  timeoutMs: number;
}

/** Every 30 s; a probe normally takes milliseconds, so 10 s is a hang even on a loaded machine. */
export const WATCHDOG_DEFAULT_INTERVAL_SECONDS = 30;
export const WATCHDOG_DEFAULT_TIMEOUT_SECONDS = 10;

export interface SharedEngineState {
  /** postgres:// or postgresql:// URL of the database the engines share. */
  postgres: string;
  /** NATS servers as `host:port`, one or more. */
  nats: string[];
}

export interface NodeOptions {
  engine: string;
  name: string;
  host: string;
  port: number;
  previewPort: number;
  dataDir: string;
  /** The URL clients and other nodes' gateways reach this node's API at. */
  advertise: string;
  /** The URL previews on this node are reached at. */
  advertisePreview: string;
  token: string | undefined;
}

export interface StartCommandOptions {
  port: number | undefined;
  host: string | undefined;
  dataDir: string | undefined;
}

type Flags = Map<string, string | true>;

/** `--name value`, `--name=value` and bare `--flag`; anything else is an error naming it. */
export function parseFlags(args: readonly string[], known: readonly string[], command: string): Flags {
  const flags: Flags = new Map();
  for (let index = 0; index < args.length; index++) {
    const arg = args[index]!;
    if (!arg.startsWith("--")) throw invalidArgument(`agentvm ${command}: unexpected argument ${JSON.stringify(arg)}; see agentvm ${command} --help`);
    const [name, inline] = arg.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
    if (name !== "help" && !known.includes(name)) throw invalidArgument(`agentvm ${command}: unknown option --${name}; it takes ${known.map((flag) => `--${flag}`).join(", ")}`);
    if (name === "help") {
      flags.set("help", true);
      continue;
    }
    const value = inline ?? args[++index];
    if (value === undefined || value.startsWith("--")) throw invalidArgument(`agentvm ${command}: --${name} needs a value`);
    flags.set(name, value);
  }
  return flags;
}

function text(flags: Flags, name: string, env: string | undefined): string | undefined {
  const value = flags.get(name);
  if (typeof value === "string") return value;
  return env !== undefined && env !== "" ? env : undefined;
}

function port(flags: Flags, name: string, env: string | undefined, fallback: number): number {
  const raw = text(flags, name, env);
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0 || value > 65535) throw invalidArgument(`--${name} must be a port from 0 to 65535, got ${JSON.stringify(raw)}`);
  return value;
}

function httpUrl(name: string, raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw invalidArgument(`--${name} must be a URL such as http://10.0.0.5:6430, got ${JSON.stringify(raw)}`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw invalidArgument(`--${name} must be an http(s) URL, got ${JSON.stringify(raw)}`);
  if (url.pathname !== "/" || url.search || url.hash) throw invalidArgument(`--${name} must be an origin without a path, got ${JSON.stringify(raw)}`);
  return url.origin;
}

export function isLoopbackAddress(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}

/** RFC 1918, CGNAT and IPv6 unique-local addresses: reachable inside a network, not from the internet. */
export function isPrivateAddress(host: string): boolean {
  if (isIP(host) === 4) {
    const [a, b] = host.split(".").map(Number) as [number, number];
    return a === 10 || (a === 172 && b >= 16 && b <= 31) || (a === 192 && b === 168) || (a === 100 && b >= 64 && b <= 127);
  }
  return isIP(host) === 6 && /^f[cd]/i.test(host);
}

function listenHost(flags: Flags, env: string | undefined): string {
  const host = text(flags, "host", env) ?? "127.0.0.1";
  if (!isLoopbackAddress(host) && !isPrivateAddress(host)) {
    throw invalidArgument(`--host ${host}: listen on loopback or on a private address (10.x, 172.16-31.x, 192.168.x, fc00::/7); put a TLS proxy in front for anything else`);
  }
  return host;
}

function nodeName(raw: string | undefined): string {
  if (raw === undefined) throw invalidArgument("agentvm node: --name is required (a short name for this node, e.g. --name a); it names the node's pool and appears in VM_NODE_UNAVAILABLE errors");
  // It ends every preview token of the node, which must stay a DNS label (≤ 63 characters).
  if (!/^[a-z0-9][a-z0-9-]{0,29}$/.test(raw)) throw invalidArgument(`--name must be 1-30 lowercase letters, digits and dashes, got ${JSON.stringify(raw)}`);
  return raw;
}

export function parseEngineOptions(flags: Flags, env: NodeJS.ProcessEnv = process.env): EngineOptions {
  const host = listenHost(flags, env.AGENTVM_ENGINE_HOST);
  const token = text(flags, "token", env.AGENTVM_ENGINE_TOKEN);
  if (!isLoopbackAddress(host) && token === undefined) {
    throw invalidArgument(`agentvm engine --host ${host}: off loopback the engine needs an admin token, or anyone on the network could place and call VMs. Pass --token <secret> (or AGENTVM_ENGINE_TOKEN); make one with \`openssl rand -hex 32\``);
  }
  const enginePort = port(flags, "port", env.AGENTVM_ENGINE_PORT, ENGINE_DEFAULT_PORT);
  if (enginePort === 0 || enginePort > 65533) throw invalidArgument(`--port must be from 1 to 65533 (the engine also takes the next two ports), got ${enginePort}`);
  const shown = host.includes(":") ? `[${host}]` : host;
  const publicRaw = text(flags, "public-url", env.AGENTVM_ENGINE_PUBLIC_URL);
  const publicUrl = publicRaw === undefined ? `http://${host === "localhost" ? "127.0.0.1" : shown}:${enginePort}` : httpUrl("public-url", publicRaw);
  if (publicRaw !== undefined && new URL(publicUrl).port === "65535") throw invalidArgument(`--public-url ${publicUrl}: its port + 1 is the peer API's address behind the same balancer, so the port must be below 65535`);
  return {
    host,
    port: enginePort,
    dataDir: resolve(text(flags, "data-dir", env.AGENTVM_ENGINE_DATA_DIR) ?? ".agentvm-engine"),
    token,
    shared: sharedState(text(flags, "postgres", env.AGENTVM_ENGINE_POSTGRES), text(flags, "nats", env.AGENTVM_ENGINE_NATS)),
    publicUrl,
    watchdog: watchdogOptions(flags, env),
  };
}

function seconds(flags: Flags, name: string, env: string | undefined, fallback: number, min: number): number {
  const raw = text(flags, name, env);
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(value) || value > 86_400 || (value !== 0 && value < min) || (value === 0 && min > 0)) {
    throw invalidArgument(`--${name} must be a whole number of seconds${min === 0 ? "" : ` from ${min}`} up to 86400${name === "watchdog" ? " (0 turns the watchdog off)" : ""}, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function watchdogOptions(flags: Flags, env: NodeJS.ProcessEnv): WatchdogOptions | undefined {
  const interval = seconds(flags, "watchdog", env.AGENTVM_ENGINE_WATCHDOG, WATCHDOG_DEFAULT_INTERVAL_SECONDS, 0);
  const timeout = seconds(flags, "watchdog-timeout", env.AGENTVM_ENGINE_WATCHDOG_TIMEOUT, WATCHDOG_DEFAULT_TIMEOUT_SECONDS, 1);
  return interval === 0 ? undefined : { intervalMs: interval * 1000, timeoutMs: timeout * 1000 };
}

/**
 * `--postgres` and `--nats` go together: engines that share PostgreSQL also
 * need NATS to reach each other's runners (a request that lands on one engine
 * for an actor whose node is connected to another travels over it). One without
 * the other is refused rather than run untested.
 */
function sharedState(postgresRaw: string | undefined, natsRaw: string | undefined): SharedEngineState | undefined {
  if (postgresRaw === undefined && natsRaw === undefined) return undefined;
  if (postgresRaw === undefined) throw invalidArgument("agentvm engine --nats needs --postgres <url> too: NATS carries messages between engines that share a PostgreSQL database");
  if (natsRaw === undefined) throw invalidArgument("agentvm engine --postgres needs --nats <url[,url]> too (e.g. --nats nats://127.0.0.1:4222): engines sharing a database reach each other's nodes over NATS");
  let postgres: URL;
  try {
    postgres = new URL(postgresRaw);
  } catch {
    throw invalidArgument("--postgres must be a URL such as postgresql://rivet:secret@10.0.0.3:5432/rivet (the value is not shown: it may hold a password)");
  }
  if (postgres.protocol !== "postgres:" && postgres.protocol !== "postgresql:") throw invalidArgument(`--postgres must be a postgres:// or postgresql:// URL, got a ${postgres.protocol} URL`);
  if (!postgres.hostname) throw invalidArgument("--postgres must name the database server's host, e.g. postgresql://rivet@10.0.0.3:5432/rivet");
  const nats = natsRaw.split(",").map((entry) => natsAddress(entry.trim()));
  return { postgres: postgresRaw, nats };
}

/**
 * `nats://host:port` or `host:port` (the port defaults to 4222), as `host:port`:
 * the engine takes addresses without a scheme (given `nats://h:p`, Rivet Engine
 * 2.3.19 exits at start-up with a DNS error).
 */
function natsAddress(raw: string): string {
  // A value with credentials is not echoed back.
  const invalid = () => invalidArgument(`--nats takes comma-separated NATS server URLs such as nats://10.0.0.4:4222, got ${raw.includes("@") ? "something else" : JSON.stringify(raw)}`);
  let url: URL;
  try {
    url = new URL(raw.includes("://") ? raw : `nats://${raw}`);
  } catch {
    throw invalid();
  }
  if (url.protocol !== "nats:" || !url.hostname || (url.pathname !== "" && url.pathname !== "/") || url.search || url.hash) throw invalid();
  if (url.username || url.password) throw invalidArgument("--nats: credentials in the URL are not supported; keep NATS on the private network (the engines' only clients are the engines)");
  return `${url.hostname}:${url.port || "4222"}`;
}

/** A PostgreSQL URL without its password, for messages and logs. */
export function redactedPostgres(url: string): string {
  const parsed = new URL(url);
  if (parsed.password) parsed.password = "***";
  return parsed.href;
}

export function parseNodeOptions(flags: Flags, env: NodeJS.ProcessEnv = process.env): NodeOptions {
  const name = nodeName(text(flags, "name", env.AGENTVM_NODE_NAME));
  const engineRaw = text(flags, "engine", env.AGENTVM_ENGINE);
  if (engineRaw === undefined) throw invalidArgument(`agentvm node: --engine is required: the URL \`agentvm engine\` printed, e.g. --engine http://127.0.0.1:${ENGINE_DEFAULT_PORT}`);
  const engine = httpUrl("engine", engineRaw);
  const host = listenHost(flags, env.HOST);
  const apiPort = port(flags, "port", env.PORT, NODE_DEFAULT_PORT);
  const previewPort = port(flags, "preview-port", env.AGENTVM_PREVIEW_PORT, apiPort === 0 ? 0 : apiPort + 1);
  const shown = host.includes(":") ? `[${host}]` : host;
  const advertiseRaw = text(flags, "advertise", env.AGENTVM_ADVERTISE);
  if (advertiseRaw === undefined && apiPort === 0) throw invalidArgument("agentvm node: --port 0 needs --advertise (clients must be told a fixed address)");
  const advertise = httpUrl("advertise", advertiseRaw ?? `http://${shown}:${apiPort}`);
  const previewRaw = text(flags, "advertise-preview", env.AGENTVM_ADVERTISE_PREVIEW);
  const advertisePreview = previewRaw === undefined ? withPort(advertise, previewPort) : httpUrl("advertise-preview", previewRaw);
  return {
    engine,
    name,
    host,
    port: apiPort,
    previewPort,
    dataDir: resolve(text(flags, "data-dir", env.AGENTVM_DATA_DIR) ?? `.agentvm-node-${name}`),
    advertise,
    advertisePreview,
    token: text(flags, "token", env.AGENTVM_ENGINE_TOKEN),
  };
}

function withPort(origin: string, newPort: number): string {
  const url = new URL(origin);
  url.port = String(newPort);
  return url.origin;
}

export function parseStartOptions(flags: Flags): StartCommandOptions {
  const raw = flags.get("port");
  return {
    port: typeof raw === "string" ? port(flags, "port", undefined, 6420) : undefined,
    host: typeof flags.get("host") === "string" ? (flags.get("host") as string) : undefined,
    dataDir: typeof flags.get("data-dir") === "string" ? resolve(flags.get("data-dir") as string) : undefined,
  };
}
