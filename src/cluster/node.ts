/**
 * `agentvm node`: today's server (files, sandboxes, HTTP API, preview gateway)
 * plus a RivetKit runner that joins the engine in this node's own pool
 * (`agentvm.<name>`). A VM is created in the pool of a live node and stays in
 * it, so it always wakes where its files are. The API refuses VMs this node
 * does not hold with VM_MOVED, which sends the client back to the engine.
 */
import { AgentVmError } from "../errors.ts";
import { TOKEN_ACTIONS } from "../server/auth.ts";
import type { Registry, RunningServer, ServerInternals } from "../server/registry.ts";
import { startServerWithHooks } from "../server/registry.ts";
import type { VmDefinition } from "../server/definition.ts";
import { NODE_ADDRESS_PREFIX, NODE_POOL_PREFIX, type NodeOptions } from "./config.ts";
import { forwardPreview, forwardPreviewUpgrade, NodeDirectory } from "./preview-forwarding.ts";
import { PROBE_ACTOR_NAME, probeActorDefinition } from "./probe-actor.ts";
import { loadRivetKit } from "./rivetkit.ts";
import { TICKET_TTL_SECONDS, vmActorDefinition, type Location } from "./vm-actor-adapter.ts";

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
  const directory = new NodeDirectory(options.engine, options.token);
  let internals: ServerInternals | undefined;
  const server = await startServerWithHooks(
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
      ready: (value) => (internals = value),
      previewOwner: options.name,
      forwardPreview: (owner, request, response) => forwardPreview(directory, owner, request, response),
      forwardPreviewUpgrade: (owner, request, socket, head) => forwardPreviewUpgrade(directory, owner, request, socket, head),
    },
  );
  const locate = (definition: string, key: string): Location => {
    // Whoever can call the engine may do anything to the VM; the ticket carries that to the node, destroy included.
    const minted = server.authRequired ? server.createToken({ definition, key, actions: [...TOKEN_ACTIONS], expiresInSeconds: TICKET_TTL_SECONDS }) : undefined;
    return { node: options.name, url: options.advertise, previewUrl: options.advertisePreview, ticket: minted?.token ?? null, expiresAt: minted?.expiresAt ?? Date.now() + TICKET_TTL_SECONDS * 1000 };
  };
  const use = Object.fromEntries(Object.keys(registry.use).map((name) => [name, vmActorDefinition(rivet, name, () => internals!, locate)]));
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
  return {
    server,
    pool,
    async close() {
      await runner.shutdown?.().catch(() => undefined);
      await server.close();
    },
  };
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
