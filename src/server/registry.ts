/**
 * `setup({ use: { vm } })` and `registry.start()`: the agentvm server. The API
 * (http://localhost:6420 by default) in front of VM actors, with state in
 * SQLite under the data directory (default ./.agentvm), and a second listener,
 * the preview origin (http://localhost:6421 by default), for preview URLs: a
 * preview page never shares the API's origin (DESIGN §3).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { resolve } from "node:path";
import { AgentVmError, invalidArgument } from "../errors.ts";
import { SqliteStore } from "../store/sqlite-store.ts";
import { findBubblewrap } from "../sandbox/bubblewrap.ts";
import { DiskPool, diskPoolSize } from "../sandbox/disk-pool.ts";
import { ensureImage } from "../image/index.ts";
import { describe, expectKnownKeys, expectObject, expectString } from "../validate.ts";
import { isVmDefinition, type VmDefinition } from "./definition.ts";
import { handleApi, MAX_LIST_LIMIT, RESERVED_DEFINITION_NAMES, sendError } from "./http-api.ts";
import { handleTerminalUpgrade, isTerminalUpgrade } from "./terminal-route.ts";
import { TokenRevocations } from "../store/token-revocations.ts";
import { apiKeysFromEnv, Authenticator, DEFAULT_MAX_TOKEN_TTL_SECONDS, loadTokenSecret, type AuthOptions, type MintedToken, type TokenRequest } from "./auth.ts";
import { isLoopbackHost, OriginPolicy } from "./request-origin.ts";
import { asleepStatus, VmActor, type DestroyResult, type VmStatus, type VmSummary } from "./vm-actor.ts";
import { canonicalKey } from "../client/client.ts";
import { PreviewGateway } from "../net/gateway.ts";
import { PreviewRedirect } from "../net/preview-redirect.ts";
import { PreviewStore } from "../store/preview-store.ts";
import type { Duplex } from "node:stream";
import { parseServerLimits, type ServerLimits } from "./server-limits.ts";
import { startLifetimeSweep } from "./lifetime-sweep.ts";
import { buildOpenApi } from "./openapi.ts";
import { withAccessLog } from "./access-log.ts";
import { parsePreviewPublicConfig, previewUrlBuilder, type PreviewUrlMode } from "./preview-public-url.ts";
import { log, parseLogLevel, setLogLevel, type LogLevel } from "../log.ts";
import { restoreVmState, type DurableAuthState, type DurableCopy, type VmDurableState } from "../store/vm-durable-state.ts";
import { vmDirectoryName } from "../vm.ts";
import { guardConnections } from "./connection-guard.ts";

export interface StartOptions {
  /** Port to listen on (default: PORT, else 6420; 0 picks a free one). */
  port?: number;
  /** Host to listen on (default: HOST, else "localhost" — both 127.0.0.1 and ::1). */
  host?: string;
  /** Where SQLite and VM directories live (default: AGENTVM_DATA_DIR, else ./.agentvm). */
  dataDir?: string;
  /** Same as limits.maxBodyBytes (kept for existing callers). */
  maxBodyBytes?: number;
  /** Caps on what one client can make the server hold; see src/server/server-limits.ts for defaults and env variables. */
  limits?: Partial<ServerLimits>;
  /**
   * Which log lines are written (default: AGENTVM_LOG_LEVEL, else "warn"): "debug", "info"
   * (adds one JSON access-log line per request), "warn", "error" or "silent".
   */
  logLevel?: LogLevel;
  /** Shut down cleanly on SIGINT/SIGTERM and exit (default true). */
  handleSignals?: boolean;
  /**
   * Who may call the API. Without any API key (here or in AGENTVM_API_KEYS) the
   * API is open, which start() allows only on a loopback host.
   */
  auth?: AuthOptions;
  /**
   * Host header names the API answers besides localhost, *.localhost, IP
   * addresses and `host` (DNS rebinding defence): exact names or ".example.com"
   * for a domain and its subdomains; true accepts any name.
   */
  allowedHosts?: readonly string[] | true;
  /** Browser origins (e.g. "https://app.example.com") allowed to call the API besides its own. */
  allowedOrigins?: readonly string[];
  /** Preview gateway settings. Previews are served on their own listener, never on the API's. */
  preview?: {
    /**
     * Port of the preview listener (default: AGENTVM_PREVIEW_PORT, else the API
     * port + 1, or a free port when the API port is 0).
     */
    port?: number;
    /** Address the preview listener binds (default: the API's `host`). */
    listenHost?: string;
    /** Host suffix for subdomain previews, `<token>.<host>` (default "preview.localhost"). */
    host?: string;
    /** A guest that has not started answering by then gets a 504 (default 60000 ms). */
    responseTimeoutMs?: number;
    /** Largest request body the gateway passes to a guest (default: no cap). */
    maxBodyBytes?: number;
    /** How often expired tokens are deleted (default 60000 ms). */
    sweepIntervalMs?: number;
    /**
     * The origin browsers reach previews on when it is not the listener's own (behind a proxy),
     * e.g. "https://previews.example.com": `preview.url` and the API's redirects use it.
     * Default: AGENTVM_PREVIEW_PUBLIC_URL, else the listener's address.
     */
    publicUrl?: string;
    /** "path" (default): `<origin>/preview/<token>/`; "subdomain": `<scheme>://<token>.<host>[:port]/`. */
    mode?: PreviewUrlMode;
  };
}

export interface RunningServer {
  /** The API, e.g. http://localhost:6420 */
  readonly url: string;
  readonly port: number;
  /** The preview origin, e.g. http://localhost:6421: `previewUrl + preview.path` (the API origin redirects there). */
  readonly previewUrl: string;
  readonly previewPort: number;
  readonly dataDir: string;
  /** False while the API is open (loopback, no API key configured). */
  readonly authRequired: boolean;
  /** VM actors held in memory now: the awake VMs plus any with a request or stream in flight (asleep, idle VMs cost nothing). */
  readonly actorsInMemory: number;
  /** Mints a short-lived token scoped to one VM and a set of actions. */
  createToken(request: TokenRequest): MintedToken;
  /** Accepts another API key from now on. */
  addApiKey(key: string | { sha256: string }): void;
  /** Refuses an API key from now on; true when it was known. */
  revokeApiKey(key: string | { sha256: string }): boolean;
  /** Ends one scoped token at once (the token, or its `id`); false when it was revoked already. Lasts across restarts. */
  revokeToken(tokenOrId: string): boolean;
  /** A definition's VMs in key order (at most `limit`, default and maximum 1000; page with `after`: the last key seen). */
  listVms(definition: string, options?: { after?: string; limit?: number }): VmSummary[];
  /**
   * Destroys a VM for good: ends its processes, revokes its preview URLs, deletes its
   * files and rows. The key then starts a fresh VM. VM_DESTROY_FAILED when it stopped
   * midway; calling it again finishes.
   */
  destroyVm(definition: string, key: string | readonly string[]): Promise<DestroyResult>;
  /** Stops accepting requests, ends every guest and closes SQLite. */
  close(): Promise<void>;
}

export class Registry<Use extends Record<string, VmDefinition>> {
  readonly use: Use;
  #running: Promise<RunningServer> | undefined;

  constructor(use: Use) {
    this.use = use;
  }

  /**
   * Starts the server; resolves once it listens. Calling it again returns the
   * same server until that one is closed (or failed to start); then it starts anew.
   */
  start(options: StartOptions = {}): Promise<RunningServer> {
    if (!this.#running) {
      const forget = () => {
        if (this.#running === running) this.#running = undefined;
      };
      const running: Promise<RunningServer> = startServer(this.use, options).then(
        (server) => ({
          ...server,
          get authRequired() {
            return server.authRequired;
          },
          get actorsInMemory() {
            return server.actorsInMemory;
          },
          close: () => server.close().finally(forget),
        }),
        (error) => {
          forget();
          throw error;
        },
      );
      this.#running = running;
    }
    return this.#running;
  }

  /**
   * Mints a token for a browser or an agent: one VM, some actions, a short
   * lifetime. Needs the server started (its secret lives in the data directory).
   */
  async createToken(request: TokenRequest): Promise<MintedToken> {
    if (!this.#running) throw new AgentVmError("INVALID_ARGUMENT", "createToken needs a started server: await registry.start() first (or POST /api/tokens with an API key)");
    return (await this.#running).createToken(request);
  }
}

export function setup<Use extends Record<string, VmDefinition>>(input: { use: Use }): Registry<Use> {
  const config = expectObject("setup input", input);
  expectKnownKeys("setup input", config, ["use"]);
  const use = expectObject("setup input.use", config.use);
  if (Object.keys(use).length === 0) throw invalidArgument("setup({ use }) needs at least one VM definition, e.g. setup({ use: { vm: agentOS() } })");
  for (const [name, definition] of Object.entries(use)) {
    if (!isVmDefinition(definition)) throw invalidArgument(`use.${name} must be a VM definition from agentOS(), got ${describe(definition)}`);
    if (!/^[A-Za-z_$][\w$]*$/.test(name)) throw invalidArgument(`use.${name}: definition names must be identifiers`);
    if (RESERVED_DEFINITION_NAMES.has(name)) throw invalidArgument(`use.${name}: the name is reserved (/api/${name}/{id} is a server route); name the definition otherwise, e.g. use: { ${name}Vm: agentOS() }`);
  }
  return new Registry(use as Use);
}

/**
 * What a cluster node (src/cluster/node.ts) adds to the server: a placement
 * check before any VM route does work, and access to the VM actors so the
 * RivetKit actor can drive the same ones the HTTP API does.
 */
export interface ServerHooks {
  /** Throws (VM_MOVED) when this server does not hold the VM. */
  placement?(definition: string, key: string): void;
  /** Called once the server listens. */
  ready?(internals: ServerInternals): void;
  /** Preview tokens carry this node name; tokens naming another node are passed to it by `forwardPreview` (HTTP) or `forwardPreviewUpgrade` (WebSockets). */
  previewOwner?: string;
  /** Passes a preview request for another node's token to that node; false when it knows no such node. */
  forwardPreview?(owner: string, request: IncomingMessage, response: ServerResponse): Promise<boolean>;
  forwardPreviewUpgrade?(owner: string, request: IncomingMessage, socket: Duplex, head: Buffer): Promise<boolean>;
  /** Where VM rows, revocations and cutoffs are copied so they outlive this server's disk. */
  durableCopy?: DurableCopy;
  /** The token secret and revocations kept beyond this server's disk; used instead of the data directory's secret. */
  auth?: DurableAuthState;
}

export interface ServerInternals {
  actor(definition: string, key: string): VmActor | undefined;
  /** True when this server has the VM's row (it holds its files). */
  holds(definition: string, key: string): boolean;
  /** Gives a VM this server has no row for the rows of a saved state (its disk was lost); its files start empty. */
  restoreVm(definition: string, key: string, state: VmDurableState): void;
}

/** registry.start() with cluster hooks; not part of the public API. */
export function startServerWithHooks(registry: Registry<Record<string, VmDefinition>>, options: StartOptions, hooks: ServerHooks): Promise<RunningServer> {
  return startServer(registry.use, options, hooks);
}

async function startServer(use: Record<string, VmDefinition>, options: StartOptions, hooks: ServerHooks = {}): Promise<RunningServer> {
  const config = expectObject("start options", options);
  expectKnownKeys("start options", config, ["port", "host", "dataDir", "maxBodyBytes", "limits", "logLevel", "handleSignals", "preview", "auth", "allowedHosts", "allowedOrigins"]);
  const limits = parseServerLimits(config.limits, process.env, config.maxBodyBytes);
  setLogLevel(parseLogLevel(config.logLevel));
  const authOptions = config.auth === undefined ? {} : expectObject("start options.auth", config.auth);
  expectKnownKeys("start options.auth", authOptions, ["apiKeys", "maxTokenTtlSeconds"]);
  if (authOptions.apiKeys !== undefined && !Array.isArray(authOptions.apiKeys)) throw invalidArgument(`start options.auth.apiKeys must be an array of keys, got ${describe(authOptions.apiKeys)}`);
  const apiKeys = [...((authOptions.apiKeys as AuthOptions["apiKeys"]) ?? []), ...apiKeysFromEnv(process.env.AGENTVM_API_KEYS)];
  const previewOptions = config.preview === undefined ? {} : expectObject("start options.preview", config.preview);
  expectKnownKeys("start options.preview", previewOptions, ["port", "listenHost", "host", "responseTimeoutMs", "maxBodyBytes", "sweepIntervalMs", "publicUrl", "mode"]);
  const previewPublic = parsePreviewPublicConfig(previewOptions.publicUrl, previewOptions.mode);
  const port = options.port ?? (process.env.PORT ? Number(process.env.PORT) : 6420);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw invalidArgument(`port must be an integer from 0 to 65535, got ${describe(port)}`);
  const host = options.host ?? process.env.HOST ?? "localhost";
  const previewHost = previewOptions.listenHost === undefined ? host : expectString("start options.preview.listenHost", previewOptions.listenHost, { nonEmpty: true });
  const envPreviewPort = process.env.AGENTVM_PREVIEW_PORT ? Number(process.env.AGENTVM_PREVIEW_PORT) : undefined;
  const previewPort = previewOptions.port ?? envPreviewPort ?? (port === 0 ? 0 : port + 1);
  if (!Number.isInteger(previewPort) || (previewPort as number) < 0 || (previewPort as number) > 65535) {
    throw invalidArgument(`preview.port must be an integer from 0 to 65535 (it defaults to the API port + 1), got ${describe(previewPort)}`);
  }
  if (port !== 0 && previewPort === port && previewHost === host) throw invalidArgument(`preview.port must differ from the API port ${port}: previews are served on their own origin`);
  const dataDir = resolve(options.dataDir ?? process.env.AGENTVM_DATA_DIR ?? ".agentvm");
  const diskPoolEntries = diskPoolSize();
  const origins = new OriginPolicy({
    host,
    ...(options.allowedHosts !== undefined ? { allowedHosts: options.allowedHosts } : {}),
    ...(options.allowedOrigins !== undefined ? { allowedOrigins: options.allowedOrigins } : {}),
  });
  if (apiKeys.length === 0 && !isLoopbackHost(host)) {
    throw new AgentVmError(
      "AUTH_NOT_CONFIGURED",
      `refusing to serve the API on ${host} without an API key: anyone who can reach it could run code in every VM. Set AGENTVM_API_KEYS=<key> (comma-separated for several) or start({ auth: { apiKeys: [key] } }); make a key with \`openssl rand -hex 32\`. Or listen on localhost.`,
    );
  }

  // The image (and each definition's software) is built once per machine; start
  // now, with progress on stderr, so the first VM does not wait for it.
  for (const [name, definition] of Object.entries(use)) {
    ensureImage({ software: definition.software }).catch((error: Error) => console.error(`agentvm: ${name}: ${error.message}`));
  }

  // Say it at start-up, not only on the first spawn: without bubblewrap no guest can run.
  findBubblewrap().catch((error: Error) => console.error(`agentvm: ${error.message}`));
  const store = new SqliteStore(dataDir);
  const revocations = new TokenRevocations(store);
  let auth: Authenticator;
  try {
    auth = new Authenticator({
      apiKeys,
      secret: hooks.auth?.secret ?? loadTokenSecret(dataDir),
      definitions: Object.keys(use),
      ...(authOptions.maxTokenTtlSeconds !== undefined ? { maxTokenTtlSeconds: authOptions.maxTokenTtlSeconds as number } : {}),
      revocations,
    });
  } catch (error) {
    store.close();
    throw error;
  }
  const previews = new PreviewStore(store);
  // Revocations kept beyond the disk are in force before the API takes a request.
  for (const [id, expiresAt] of hooks.auth?.revoked ?? []) revocations.revoke(id, expiresAt);
  for (const [definition, key, notBefore] of hooks.auth?.cutoffs ?? []) if ((revocations.cutoff(definition, key) ?? 0) < notBefore) revocations.setCutoff(definition, key, notBefore);
  const actors = new Map<string, VmActor>();
  let closing = false;
  /** Set once the preview listener is bound, before the API takes requests. */
  let previewUrl = "";
  let previewUrlFor: (token: string) => string = () => "";
  const requireDefinition = (name: string, what: string) => {
    if (!Object.hasOwn(use, name)) throw new AgentVmError("UNKNOWN_ACTION", `${what}: no VM definition named ${JSON.stringify(name)} in this registry`);
  };
  let openApiDocument: unknown;
  const context = {
    maxBodyBytes: limits.maxBodyBytes,
    openApi: () => (openApiDocument ??= buildOpenApi(Object.keys(use))),
    ...(hooks.placement ? { placement: hooks.placement } : {}),
    auth,
    origins,
    hasDefinition: (name: string) => Object.hasOwn(use, name),
    definitions: () => Object.keys(use),
    listVms(definitionName: string, options: { after?: string; limit?: number } = {}): VmSummary[] {
      requireDefinition(definitionName, "listVms");
      const limit = options.limit ?? MAX_LIST_LIMIT;
      if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIST_LIMIT) throw invalidArgument(`listVms: limit must be an integer from 1 to ${MAX_LIST_LIMIT}, got ${describe(limit)}`);
      if (options.after !== undefined && typeof options.after !== "string") throw invalidArgument(`listVms: after must be a key, got ${describe(options.after)}`);
      return store.listVms(definitionName, options.after ?? "", limit).map((record) => ({
        key: record.key,
        awake: actors.get(`${definitionName}\u0000${record.key}`)?.awake ?? false,
        createdAt: record.createdAt,
        lastActiveAt: record.lastActiveAt,
        wakeCount: record.wakeCount,
        diskBytes: record.diskBytes,
        ...(record.destroying ? { destroying: true as const } : {}),
      }));
    },
    vmStatus(definitionName: string, key: string): VmStatus {
      requireDefinition(definitionName, "status");
      return actors.get(`${definitionName}\u0000${key}`)?.status() ?? asleepStatus(store, definitionName, key);
    },
    async destroyVm(definitionName: string, key: string): Promise<DestroyResult> {
      requireDefinition(definitionName, "destroyVm");
      const actor = context.actor(definitionName, key)!;
      // Its tokens end with it: the key may start a fresh VM that they must not reach.
      const now = Date.now();
      auth.revokeTokensOfVm(definitionName, key, now);
      await hooks.durableCopy?.saveCutoff(definitionName, key, now);
      return actor.destroy();
    },
    /** Ends one scoped token; on a cluster node the revocation is saved beyond the disk before this returns. */
    async revokeToken(tokenOrId: unknown): Promise<boolean> {
      const { id, expiresAt } = auth.revocationOf(tokenOrId);
      const revoked = revocations.revoke(id, expiresAt);
      await hooks.durableCopy?.saveRevocation(id, expiresAt);
      return revoked;
    },
    actor(definitionName: string, key: string): VmActor | undefined {
      const definition = Object.hasOwn(use, definitionName) ? use[definitionName] : undefined;
      if (!definition) return undefined;
      if (closing) throw new AgentVmError("SERVER_CLOSING", "the server is shutting down; retry against a running server");
      const id = `${definitionName}\u0000${key}`;
      let actor = actors.get(id);
      if (!actor) {
        // An actor is kept only while it holds something (an awake VM, a request, a stream);
        // an idle one is dropped, so keys that were only asked about cost nothing.
        const onIdle = (idle: VmActor) => {
          if (actors.get(id) === idle) actors.delete(id);
        };
        actor = new VmActor({ definitionName, key, definition, dataDir, store, previews, previewUrl: (token) => previewUrlFor(token), onIdle, maxVms: limits.maxVmsPerDefinition, ...(hooks.previewOwner !== undefined ? { previewOwner: hooks.previewOwner } : {}), ...(hooks.durableCopy ? { durableCopy: hooks.durableCopy } : {}) });
        actors.set(id, actor);
      }
      return actor;
    },
  };

  const gateway = new PreviewGateway({
    store: previews,
    ...(hooks.forwardPreview && hooks.forwardPreviewUpgrade && hooks.previewOwner !== undefined
      ? { elsewhere: { self: hooks.previewOwner, forward: hooks.forwardPreview, forwardUpgrade: hooks.forwardPreviewUpgrade } }
      : {}),
    ...(previewOptions.host !== undefined
      ? { previewHost: String(previewOptions.host) }
      : previewPublic.mode === "subdomain" && previewPublic.publicUrl
        ? { previewHost: previewPublic.publicUrl.hostname }
        : {}),
    ...(previewOptions.responseTimeoutMs !== undefined ? { responseTimeoutMs: Number(previewOptions.responseTimeoutMs) } : {}),
    ...(previewOptions.maxBodyBytes !== undefined ? { maxBodyBytes: Number(previewOptions.maxBodyBytes) } : {}),
    async acquire(row) {
      const actor = context.actor(row.definition, row.key);
      if (!actor) throw new AgentVmError("UNKNOWN_ACTION", `this server no longer defines ${row.definition}`);
      const release = actor.hold();
      try {
        // A dev server that restarts on wake needs a moment before its port answers: the connection waits for it (see VmActor).
        const vm = await actor.wake();
        return { vm, release };
      } catch (error) {
        release();
        throw error;
      }
    },
  });
  const maxTokenTtlMs = Number(authOptions.maxTokenTtlSeconds ?? DEFAULT_MAX_TOKEN_TTL_SECONDS) * 1000;
  const sweep = setInterval(() => {
    previews.sweep(Date.now());
    revocations.sweep(Date.now(), maxTokenTtlMs);
  }, Number(previewOptions.sweepIntervalMs ?? 60_000));
  sweep.unref();
  const lifetimes = startLifetimeSweep(use, store, (definition, key) => context.destroyVm(definition, key));

  let redirect: PreviewRedirect | undefined;
  const apiHandler = withAccessLog("api", (request: IncomingMessage, response: ServerResponse) => {
    // A preview URL sent to the API origin goes to the preview origin: it is never served here.
    if (redirect!.handleRequest(request, response)) return;
    handleApi(context, request, response).catch((error) => sendError(response, error));
  });
  let previewHosts: OriginPolicy | undefined;
  const previewHandler = withAccessLog("preview", (request: IncomingMessage, response: ServerResponse) => {
    try {
      previewHosts!.checkHost(request);
    } catch (error) {
      return sendError(response, error);
    }
    if (gateway.handleRequest(request, response)) return;
    const body = `Not a preview URL. Previews are /preview/<token>/… or <token>.${gateway.previewHost}; the API is on another origin.\n`;
    response.writeHead(404, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(body), "access-control-allow-origin": "*" });
    response.end(body);
  });

  let servers: Server[];
  let previewServers: Server[];
  try {
    servers = await listenAll(host, port, apiHandler, limits, "API");
    try {
      previewServers = await listenAll(previewHost, previewPort as number, previewHandler, limits, "preview origin", "preview.port / AGENTVM_PREVIEW_PORT");
    } catch (error) {
      for (const server of servers) server.close();
      throw error;
    }
  } catch (error) {
    clearInterval(sweep);
    lifetimes.stop();
    store.close();
    throw error;
  }
  // New VMs' disks, made ahead of time (nothing to close if start-up failed before here).
  const diskPool = DiskPool.open(dataDir, diskPoolEntries);
  const boundPort = (servers[0]!.address() as { port: number }).port;
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${boundPort}`;
  const boundPreviewPort = (previewServers[0]!.address() as { port: number }).port;
  previewUrl = `http://${previewHost.includes(":") ? `[${previewHost}]` : previewHost}:${boundPreviewPort}`;
  previewUrlFor = previewUrlBuilder(previewPublic, previewUrl, gateway.previewHost);
  // Browsers are sent where they can reach previews: the public URL when the server is behind a proxy.
  redirect = new PreviewRedirect(gateway, previewPublic.publicUrl?.origin ?? previewUrl);
  // The preview listener answers its own names only (DNS rebinding): loopback names and IPs, its
  // listen host, the subdomain host and its subdomains, the public URL's host, and allowedHosts.
  previewHosts = new OriginPolicy({
    host: previewHost,
    allowedHosts:
      options.allowedHosts === true
        ? true
        : [...(options.allowedHosts ?? []), `.${gateway.previewHost}`, ...(previewPublic.publicUrl ? [previewPublic.publicUrl.hostname] : [])],
  });
  // Upgraded sockets (preview WebSockets, terminals) leave the HTTP server's bookkeeping, so
  // closeAllConnections does not end them and server.close would wait for them forever.
  const upgraded = new Set<Duplex>();
  for (const server of servers) {
    // The API's one WebSocket route is the terminal; a preview's WebSocket is told where previews are.
    server.on("upgrade", (request: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (closing) return void socket.destroy();
      if (isTerminalUpgrade(request)) {
        upgraded.add(socket);
        socket.once("close", () => upgraded.delete(socket));
        return handleTerminalUpgrade(context, request, socket, head);
      }
      if (!redirect!.handleUpgrade(request, socket)) socket.destroy();
    });
  }
  for (const server of previewServers) {
    server.on("upgrade", (request: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (closing || !hostAllowed(previewHosts!, request) || !gateway.handleUpgrade(request, socket, head)) return void socket.destroy();
      upgraded.add(socket);
      socket.once("close", () => upgraded.delete(socket));
    });
  }
  console.log(`agentvm: API on ${url}; previews on ${previewUrl} (${previewUrl}/preview/<token>/, or http://<token>.${gateway.previewHost}:${boundPreviewPort}/)`);
  if (auth.open) {
    console.warn(
      `agentvm: the API on ${url} is OPEN: no API key is set, so any program on this machine can run code in every VM. Set AGENTVM_API_KEYS or start({ auth: { apiKeys } }) to require one.`,
    );
  }

  hooks.ready?.({
    actor: (definition, key) => context.actor(definition, key),
    holds: (definition, key) => store.getVm(definition, key) !== undefined,
    restoreVm(definition, key, state) {
      if (store.getVm(definition, key)) return;
      // A state older than the VM's destroy here is what the destroy is about to drop, not a lost disk's.
      if ((revocations.cutoff(definition, key) ?? -1) >= state.createdAt) return;
      restoreVmState(store, previews, definition, key, vmDirectoryName(key), state);
      log("info", `VM ${JSON.stringify(key)} (${definition}) restored from its saved state: its rows and preview URLs are back, its files start empty`, { definition, key });
    },
  });

  let closed: Promise<void> | undefined;
  const close = () =>
    (closed ??= (async () => {
      closing = true;
      clearInterval(sweep);
      lifetimes.stop();
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
      for (const socket of upgraded) socket.destroy();
      await Promise.all(
        [...servers, ...previewServers].map(
          (server) =>
            new Promise<void>((done) => {
              server.close(() => done());
              server.closeAllConnections();
            }),
        ),
      );
      await Promise.all([...actors.values()].map((actor) => actor.close()));
      await diskPool?.close();
      store.close();
    })());

  function onSignal(signal: NodeJS.Signals): void {
    console.log(`agentvm: ${signal} received, shutting down`);
    close().then(
      () => process.exit(0),
      (error) => {
        console.error("agentvm: shutdown failed", error);
        process.exit(1);
      },
    );
  }
  if (options.handleSignals !== false) {
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
  }
  return {
    url,
    port: boundPort,
    previewUrl,
    previewPort: boundPreviewPort,
    dataDir,
    get authRequired() {
      return !auth.open;
    },
    get actorsInMemory() {
      return actors.size;
    },
    createToken: (request: TokenRequest) => auth.mintToken(request),
    addApiKey: (key: string | { sha256: string }) => auth.addApiKey(key),
    revokeApiKey: (key: string | { sha256: string }) => auth.revokeApiKey(key),
    revokeToken: (tokenOrId: string) => auth.revokeToken(tokenOrId),
    listVms: (definition: string, options?: { after?: string; limit?: number }) => context.listVms(definition, options),
    destroyVm: async (definition: string, key: string | readonly string[]) => context.destroyVm(definition, canonicalKey(key)),
    close,
  };
}

function hostAllowed(policy: OriginPolicy, request: IncomingMessage): boolean {
  try {
    policy.checkHost(request);
    return true;
  } catch {
    return false;
  }
}

/** "localhost" means both loopback families, as browsers and fetch may try either. */
async function listenAll(
  host: string,
  port: number,
  handler: (request: IncomingMessage, response: ServerResponse) => void,
  limits: ServerLimits,
  what: string,
  portOption = "start({ port }) / PORT",
): Promise<Server[]> {
  const hosts = host === "localhost" ? ["127.0.0.1", "::1"] : [host];
  const servers: Server[] = [];
  let chosenPort = port;
  for (const [index, address] of hosts.entries()) {
    const server = createServer({ keepAliveTimeout: 65_000, maxHeaderSize: limits.maxHeaderBytes }, handler);
    server.maxHeadersCount = limits.maxHeadersCount;
    guardConnections(server, { maxConnectionsPerClient: limits.maxConnectionsPerClient, maxHeaderBytes: limits.maxHeaderBytes, what, trustedProxies: limits.trustedProxies });
    try {
      await new Promise<void>((done, fail) => {
        server.once("error", fail);
        server.listen(chosenPort, address, () => {
          server.off("error", fail);
          done();
        });
      });
    } catch (error) {
      // A host without IPv6 still serves on 127.0.0.1.
      if (index > 0 && ["EADDRNOTAVAIL", "EAFNOSUPPORT"].includes((error as NodeJS.ErrnoException).code ?? "")) continue;
      for (const started of servers) started.close();
      const code = (error as NodeJS.ErrnoException).code;
      throw new AgentVmError(
        code === "EADDRINUSE" ? "EADDRINUSE" : "INTERNAL",
        code === "EADDRINUSE" ? `port ${chosenPort} on ${address} is already in use; stop the other server or pass ${portOption}` : `cannot listen on ${address}:${chosenPort}: ${(error as Error).message}`,
      );
    }
    chosenPort = (server.address() as { port: number }).port;
    servers.push(server);
  }
  return servers;
}
