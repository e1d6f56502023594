/**
 * `agentvm node`: today's server (files, sandboxes, HTTP API, preview gateway)
 * plus a RivetKit runner that joins the engine in this node's own pool
 * (`agentvm.<name>`). A VM is created in the pool of a live node and stays in
 * it, so it always wakes where its files are. The API refuses VMs this node
 * does not hold with VM_MOVED, which sends the client back to the engine.
 *
 * What must outlive the node's disk (VM rows, preview tokens, the token secret,
 * revocations) is kept in the engine with the VMs' actors and the node's own
 * actor (durable-state.ts); a node that starts without it gets it back.
 */
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { SQLITE_FILE } from "../store/sqlite-store.ts";
import { AgentVmError } from "../errors.ts";
import { DEFAULT_MAX_TOKEN_TTL_SECONDS, loadTokenSecret, TOKEN_ACTIONS } from "../server/auth.ts";
import { deserializeActorKey, EngineApi } from "../client/engine-api.ts";
import { log } from "../log.ts";
import type { DurableAuthState } from "../store/vm-durable-state.ts";
import { durableAuth, NODE_ACTOR, NodeDurability } from "./durable-state.ts";
import { nodeActorDefinition } from "./node-actor.ts";
import type { Registry, RunningServer, ServerInternals } from "../server/registry.ts";
import { startServerWithHooks } from "../server/registry.ts";
import type { VmDefinition } from "../server/definition.ts";
import { NODE_ADDRESS_PREFIX, NODE_POOL_PREFIX, type NodeOptions } from "./config.ts";
import { forwardPreview, forwardPreviewUpgrade, NodeDirectory } from "./preview-forwarding.ts";
import { PROBE_ACTOR_NAME, probeActorDefinition } from "./probe-actor.ts";
import { loadRivetKit } from "./rivetkit.ts";
import { TICKET_TTL_SECONDS, vmActorDefinition, type Location } from "./vm-actor-adapter.ts";

/** A node's actor may first wait for the runner to be placed; restoring a VM may wait for its actor the same way. */
const ATTACH_TIMEOUT_MS = 30_000;

export interface RunningNode {
  readonly server: RunningServer;
  readonly pool: string;
  close(): Promise<void>;
}

export async function startNode(registry: Registry<Record<string, VmDefinition>>, options: NodeOptions): Promise<RunningNode> {
  // RivetKit's native core logs through RUST_LOG; its warnings are not ours to show.
  process.env.RUST_LOG ??= "error";
  const rivet = await loadRivetKit();
  const pool = `${NODE_POOL_PREFIX}${options.name}`;
  await ensurePool(options, pool);
  const authorization: Record<string, string> = options.token ? { authorization: `Bearer ${options.token}` } : {};
  const engine = new EngineApi(options.engine, (url, init) => fetch(url, { ...init, headers: { ...(init.headers as Record<string, string>), ...authorization } }));
  const directory = new NodeDirectory(options.engine, options.token);
  const durability = new NodeDurability(engine);
  // The runner joins before the server starts (the server's token secret comes from the node's
  // actor); VM actors the engine starts meanwhile wait for the server.
  const serverReady = Promise.withResolvers<ServerInternals>();
  const nodeClosed = Promise.withResolvers<void>();
  let server: RunningServer | undefined;
  let internals: ServerInternals | undefined;
  const locate = (definition: string, key: string): Location => {
    // Whoever can call the engine may do anything to the VM; the ticket carries that to the node, destroy included.
    const minted = server!.authRequired ? server!.createToken({ definition, key, actions: [...TOKEN_ACTIONS], expiresInSeconds: TICKET_TTL_SECONDS }) : undefined;
    return { node: options.name, url: options.advertise, previewUrl: options.advertisePreview, ticket: minted?.token ?? null, expiresAt: minted?.expiresAt ?? Date.now() + TICKET_TTL_SECONDS * 1000 };
  };
  const use: Record<string, unknown> = Object.fromEntries(Object.keys(registry.use).map((name) => [name, vmActorDefinition(rivet, name, () => serverReady.promise, durability, locate)]));
  use[NODE_ACTOR] = nodeActorDefinition(rivet, durability, nodeClosed.promise);
  // The engine watchdog's probe (agentvm engine --watchdog): a do-nothing actor it creates and destroys.
  use[PROBE_ACTOR_NAME] = probeActorDefinition(rivet);
  const runner = rivet.setup({
    use,
    endpoint: options.engine,
    ...(options.token ? { token: options.token } : {}),
    namespace: "default",
    envoy: { poolName: pool },
    noWelcome: true,
    // Services are the engine's add-ons; a node needs none, and its process would outlive us.
    startServices: false,
    logging: { level: process.env.AGENTVM_RIVET_LOG ?? "error" },
    shutdown: { disableSignalHandlers: true, gracePeriodMs: 5_000 },
  }) as { start(): void; shutdown?(): Promise<void> };
  runner.start();
  const stopRunner = async () => {
    nodeClosed.resolve();
    await runner.shutdown?.().catch(() => undefined);
  };
  // A data directory without a database is a new node, or one whose disk was lost: only then can
  // the engine hold VMs this node has no rows for.
  const freshDisk = !existsSync(join(options.dataDir, SQLITE_FILE));
  try {
    await joined(engine, options, pool);
    const auth = await attachNodeActor(engine, options, pool, durability);
    server = await startServerWithHooks(
      registry,
      {
        port: options.port,
        host: options.host,
        dataDir: options.dataDir,
        preview: { port: options.previewPort },
        handleSignals: false,
      },
      {
        placement(definition, key) {
          if (internals?.holds(definition, key)) return;
          throw new AgentVmError("VM_MOVED", `node ${options.name} does not hold VM ${JSON.stringify(key)}; locate it through the engine (the client does this by itself)`);
        },
        ready: (value) => {
          internals = value;
          serverReady.resolve(value);
        },
        previewOwner: options.name,
        forwardPreview: (owner, request, response) => forwardPreview(directory, owner, request, response),
        forwardPreviewUpgrade: (owner, request, socket, head) => forwardPreviewUpgrade(directory, owner, request, socket, head),
        durableCopy: durability,
        auth,
      },
    );
  } catch (error) {
    await stopRunner();
    throw error;
  }
  if (freshDisk) await restoreLostVms(engine, registry, pool, await serverReady.promise);
  const running = server;
  return {
    server: running,
    pool,
    async close() {
      await stopRunner();
      await running.close();
    },
  };
}

/**
 * Resolves once the engine lists this node's runner in its pool. An actor created
 * in the pool before then can be left unplaced for good ("no_capacity"), so the
 * node's own actor is created only after.
 */
async function joined(engine: EngineApi, options: NodeOptions, pool: string): Promise<void> {
  const deadline = Date.now() + ATTACH_TIMEOUT_MS;
  while (!(await engine.envoys()).some((envoy) => envoy.pool_name === pool && envoy.stop_ts === null)) {
    if (Date.now() > deadline) throw new AgentVmError("CLUSTER_UNAVAILABLE", `node ${options.name}: its runner did not join the engine at ${options.engine} within ${ATTACH_TIMEOUT_MS / 1000} s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Finds (or makes) the node's own actor and asks it for the token secret and revocations kept in the engine. */
async function attachNodeActor(engine: EngineApi, options: NodeOptions, pool: string, durability: NodeDurability): Promise<DurableAuthState> {
  const actor = (await engine.findActor(NODE_ACTOR, options.name)) ?? (await engine.createActor(NODE_ACTOR, options.name, pool));
  durability.nodeActorId = actor.actor_id;
  // The data directory's secret is proposed: a node that ran before keeps its tokens valid.
  mkdirSync(options.dataDir, { recursive: true, mode: 0o700 });
  const proposed = loadTokenSecret(options.dataDir).toString("hex");
  let answer: Awaited<ReturnType<EngineApi["action"]>>;
  try {
    answer = await engine.action(actor.actor_id, "attach", [proposed, DEFAULT_MAX_TOKEN_TTL_SECONDS * 1000], ATTACH_TIMEOUT_MS);
  } catch (error) {
    throw new AgentVmError("CLUSTER_UNAVAILABLE", `node ${options.name}: its actor in the engine at ${options.engine} did not answer (${(error as Error).message}); check that the engine runs, and that no other node runs with --name ${options.name}`, { cause: error });
  }
  if (answer.status >= 400 || !answer.output) throw new AgentVmError("CLUSTER_UNAVAILABLE", `node ${options.name}: its actor in the engine answered ${answer.status}: ${answer.text.slice(0, 300)}`);
  return durableAuth(answer.output as Parameters<typeof durableAuth>[0]);
}

/**
 * A node that lost its disk holds none of its VMs' rows, so until each VM's actor
 * wakes, its preview URLs would be unknown here. Every actor of this node's pool
 * whose VM has no row is woken once (its wake restores the rows). Run only when
 * the node starts on a data directory without a database.
 */
async function restoreLostVms(engine: EngineApi, registry: Registry<Record<string, VmDefinition>>, pool: string, internals: ServerInternals): Promise<void> {
  let restored = 0;
  for (const definition of Object.keys(registry.use)) {
    let cursor: string | null = null;
    do {
      const page: Awaited<ReturnType<EngineApi["listActors"]>> = await engine.listActors(definition, cursor).catch((error: Error) => {
        log("warn", `could not list this node's VMs in the engine to restore lost ones: ${error.message}`);
        return { actors: [], cursor: null };
      });
      cursor = page.cursor;
      for (const actor of page.actors) {
        if (actor.runner_name_selector !== pool || actor.destroy_ts !== null || actor.key === undefined) continue;
        const key = deserializeActorKey(actor.key);
        if (internals.holds(definition, key)) continue;
        try {
          const answer = await engine.action<boolean>(actor.actor_id, "restore", [], ATTACH_TIMEOUT_MS);
          if (answer.output === true) restored++;
        } catch (error) {
          log("warn", `could not restore VM ${JSON.stringify(key)} from the engine: ${(error as Error).message}`, { definition, key });
        }
      }
    } while (cursor);
  }
  if (restored > 0) console.log(`agentvm: restored ${restored} VM(s) from the engine: their rows and preview URLs are back; their files start empty (this node's disk was lost)`);
}

/**
 * A pool must have a runner config before a runner joins it; PUT is idempotent.
 * A second, runner-less config carries this node's addresses for other nodes'
 * preview gateways (src/cluster/preview-forwarding.ts).
 */
async function ensurePool(options: NodeOptions, pool: string): Promise<void> {
  const addresses = { url: options.advertise, previewUrl: options.advertisePreview };
  await putRunnerConfig(options, pool, { default: { normal: {} } });
  await putRunnerConfig(options, `${NODE_ADDRESS_PREFIX}${options.name}`, { default: { normal: {}, metadata: { agentvm: addresses } } });
}

async function putRunnerConfig(options: NodeOptions, name: string, datacenters: Record<string, unknown>): Promise<void> {
  let response: Response;
  try {
    response = await fetch(`${options.engine}/runner-configs/${encodeURIComponent(name)}?namespace=default`, {
      method: "PUT",
      headers: { "content-type": "application/json", ...(options.token ? { authorization: `Bearer ${options.token}` } : {}) },
      body: JSON.stringify({ datacenters }),
      signal: AbortSignal.timeout(10_000),
    });
  } catch (error) {
    throw new AgentVmError("CLUSTER_UNAVAILABLE", `cannot reach the engine at ${options.engine} (${(error as Error).message}); start it with \`agentvm engine\` and pass the URL it prints`, { cause: error });
  }
  if (!response.ok) throw new AgentVmError("CLUSTER_UNAVAILABLE", `the engine at ${options.engine} refused runner config ${name}: ${response.status} ${(await response.text()).slice(0, 300)}`);
}
