#!/usr/bin/env node
/**
 * The `agentvm` command:
 *
 *   agentvm start    today's single-node server (what `npm start` runs)
 *   agentvm engine   the Rivet Engine, configured safely, as our child
 *   agentvm node     an agentvm node: the server plus a runner in its own pool
 *
 * Options are parsed in src/cluster/config.ts. Each command says where it
 * listens and what to run next.
 */
import { pathToFileURL } from "node:url";
import { resolve } from "node:path";
import { AgentVmError } from "../errors.ts";
import { ENGINE_DEFAULT_PORT, NODE_DEFAULT_PORT, parseEngineOptions, parseFlags, parseNodeOptions, parseStartOptions, redactedPostgres } from "../cluster/config.ts";

const HELP: Record<string, string> = {
  "": `agentvm: a VM per AI agent inside your backend.

Commands:
  agentvm start     the single-node server (API on :6420, previews on :6421)
  agentvm engine    run the Rivet Engine for a cluster of agentvm nodes
  agentvm node      run an agentvm node that joins an engine

Run \`agentvm <command> --help\` for its options. Cluster mode is described in docs/cluster.md.`,
  start: `agentvm start [--port 6420] [--host localhost] [--data-dir ./.agentvm]

The single-node server with a demo VM, as \`npm start\`. PORT, HOST, AGENTVM_DATA_DIR and
AGENTVM_API_KEYS work as for registry.start().`,
  engine: `agentvm engine [--host 127.0.0.1] [--port ${ENGINE_DEFAULT_PORT}] [--data-dir ./.agentvm-engine] [--token <secret>]
               [--postgres <url> --nats <url[,url]>] [--public-url <url>]
               [--watchdog <seconds, 30; 0 = off>] [--watchdog-timeout <seconds, 10>]

Runs the Rivet Engine (from npm, \`npm run cluster:install\`) with a configuration written to
<data-dir>/engine-config.json: it listens on --host only (loopback, or a private address —
then --token is required), on --port and the next two ports (peer API, metrics), telemetry
off, and short failover timeouts. The engine stops with this command.
State lives in <data-dir>/db, or, with --postgres and --nats, in PostgreSQL and NATS shared
by several engines (an HA engine): run each with the same --postgres, --nats, --token and
--public-url (the load balancer in front of them, which forwards its port and the next one
to every engine's --port and --port + 1); give nodes and clients --public-url.
The watchdog creates and destroys a probe actor in a live node's pool every --watchdog
seconds; when that hangs past --watchdog-timeout twice in a row (Rivet Engine 2.3.19 can stop
creating actors, see docs/cluster.md) it restarts the engine on the same state.
Environment: AGENTVM_ENGINE_HOST, AGENTVM_ENGINE_PORT, AGENTVM_ENGINE_DATA_DIR, AGENTVM_ENGINE_TOKEN,
AGENTVM_ENGINE_POSTGRES, AGENTVM_ENGINE_NATS, AGENTVM_ENGINE_PUBLIC_URL, AGENTVM_ENGINE_WATCHDOG,
AGENTVM_ENGINE_WATCHDOG_TIMEOUT.`,
  node: `agentvm node --engine <url> --name <node> [--advertise <url>] [--port ${NODE_DEFAULT_PORT}] [--preview-port <port+1>]
             [--host 127.0.0.1] [--data-dir ./.agentvm-node-<name>] [--advertise-preview <url>]
             [--token <engine token>] [--registry <module exporting \`registry\`>]

An agentvm node: the server (API, preview gateway, VM files under --data-dir) plus a
RivetKit runner in the engine pool "agentvm.<name>". VMs placed on this node stay on it.
--advertise is the URL clients reach this node's API at (default http://<host>:<port>).
Without --registry the node serves setup({ use: { vm: agentOS() } }).
Environment: AGENTVM_ENGINE, AGENTVM_NODE_NAME, AGENTVM_ADVERTISE, PORT, HOST, AGENTVM_DATA_DIR.`,
};

async function main(argv: string[]): Promise<void> {
  const [command = "", ...rest] = argv;
  if (command === "--help" || command === "-h" || command === "help" || command === "") {
    console.log(HELP[""]);
    return;
  }
  if (!Object.hasOwn(HELP, command)) throw new AgentVmError("INVALID_ARGUMENT", `unknown command ${JSON.stringify(command)}; run agentvm --help`);
  const known = { start: ["port", "host", "data-dir"], engine: ["host", "port", "data-dir", "token", "postgres", "nats", "public-url", "watchdog", "watchdog-timeout"], node: ["engine", "name", "advertise", "advertise-preview", "port", "preview-port", "host", "data-dir", "token", "registry"] }[command as "start" | "engine" | "node"];
  const flags = parseFlags(rest, known, command);
  if (flags.has("help")) {
    console.log(HELP[command]);
    return;
  }
  if (command === "start") return runStart(parseStartOptions(flags));
  if (command === "engine") return runEngine(flags);
  return runNode(flags);
}

async function runStart(options: ReturnType<typeof parseStartOptions>): Promise<void> {
  if (options.port !== undefined) process.env.PORT = String(options.port);
  if (options.host !== undefined) process.env.HOST = options.host;
  if (options.dataDir !== undefined) process.env.AGENTVM_DATA_DIR = options.dataDir;
  await import("../main.ts");
}

async function runEngine(flags: ReturnType<typeof parseFlags>): Promise<void> {
  const { startEngine } = await import("../cluster/engine.ts");
  const { startWatchdog } = await import("../cluster/engine-watchdog.ts");
  const options = parseEngineOptions(flags);
  let engine = await startEngine(options);
  const state = options.shared ? `state in PostgreSQL ${redactedPostgres(options.shared.postgres)}, pub/sub on NATS ${options.shared.nats.join(",")}` : `data in ${options.dataDir}`;
  const endpoint = options.publicUrl;
  console.log(`agentvm engine: Rivet Engine ${engine.url} (pid ${engine.pid}; config ${engine.configPath}; ${state})${endpoint === engine.url ? "" : `; nodes and clients reach it at ${endpoint}`}
${options.watchdog ? `Watchdog: a probe actor every ${options.watchdog.intervalMs / 1000} s; two probes hung past ${options.watchdog.timeoutMs / 1000} s in a row restart the engine (--watchdog 0 turns it off).` : "Watchdog off."}

Next, start nodes (each on its own port and data directory), e.g.:
  agentvm node --engine ${endpoint} --name a --port ${NODE_DEFAULT_PORT}
  agentvm node --engine ${endpoint} --name b --port ${NODE_DEFAULT_PORT + 10}
Then point clients at the engine: createClient<typeof registry>("${endpoint}").vm.getOrCreate("my-vm")
Ctrl-C stops the engine.`);
  let stopping = false;
  // While the watchdog restarts the engine, the old one's exit is expected: wait for the new one.
  let restarting: Promise<void> | undefined;
  const watchdog = options.watchdog
    ? startWatchdog({
        engineUrl: () => engine.url,
        token: options.token,
        ...options.watchdog,
        log: (line) => console.log(line),
        restart: (why) => {
          restarting = (async () => {
            console.log(`agentvm engine: watchdog: restarting the Rivet Engine (pid ${engine.pid}): ${why}`);
            await engine.stop();
            if (stopping) return;
            try {
              engine = await startEngine(options);
            } catch (error) {
              console.error(`agentvm engine: watchdog: the Rivet Engine did not start again: ${(error as Error).message}`);
              process.exit(1);
            }
            console.log(`agentvm engine: watchdog: Rivet Engine restarted ${engine.url} (pid ${engine.pid}); runners reconnect by themselves`);
          })();
          return restarting.finally(() => (restarting = undefined));
        },
      })
    : undefined;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    watchdog?.stop();
    console.log(`agentvm engine: ${signal}, stopping the engine`);
    void (restarting ?? Promise.resolve()).then(() => engine.stop()).then(() => process.exit(0));
  };
  process.once("SIGINT", () => stop("SIGINT"));
  process.once("SIGTERM", () => stop("SIGTERM"));
  for (;;) {
    const current = engine;
    const code = await current.exited;
    // Asked to stop: stop() exits 0 once the engine is gone.
    if (stopping) return;
    if (restarting) await restarting;
    if (engine !== current) continue;
    // Otherwise the engine ended on its own.
    watchdog?.stop();
    console.error(`agentvm engine: the Rivet Engine exited (${code}); stopping`);
    process.exit(1);
  }
}

async function runNode(flags: ReturnType<typeof parseFlags>): Promise<void> {
  const { startNode } = await import("../cluster/node.ts");
  const { agentOS, setup } = await import("../server/index.ts");
  const options = parseNodeOptions(flags);
  const modulePath = flags.get("registry");
  const registry = typeof modulePath === "string" ? await loadRegistry(modulePath) : setup({ use: { vm: agentOS() } });
  const node = await startNode(registry, options);
  console.log(`agentvm node ${options.name}: API ${node.server.url} (advertised as ${options.advertise}), previews ${node.server.previewUrl} (advertised as ${options.advertisePreview}), data in ${node.server.dataDir}
Joined the engine ${options.engine} in pool ${node.pool}.

Clients use the engine, not this node: createClient<typeof registry>("${options.engine}").vm.getOrCreate("my-vm")
Ctrl-C stops the node; its VMs answer VM_NODE_UNAVAILABLE until it is back.`);
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    console.log(`agentvm node ${options.name}: ${signal}, shutting down`);
    void node.close().finally(() => process.exit(0));
  };
  process.once("SIGINT", () => stop("SIGINT"));
  process.once("SIGTERM", () => stop("SIGTERM"));
}

async function loadRegistry(path: string): Promise<Parameters<typeof import("../cluster/node.ts").startNode>[0]> {
  const module = (await import(pathToFileURL(resolve(path)).href)) as { registry?: unknown };
  const registry = module.registry as { use?: unknown } | undefined;
  if (!registry || typeof registry !== "object" || typeof registry.use !== "object") {
    throw new AgentVmError("INVALID_ARGUMENT", `--registry ${path} must export \`registry\` (from setup({ use })) and not start it`);
  }
  return registry as Parameters<typeof import("../cluster/node.ts").startNode>[0];
}

main(process.argv.slice(2)).catch((error: unknown) => {
  const shown = error instanceof AgentVmError ? `${error.code}: ${error.message}` : (error as Error)?.stack ?? String(error);
  console.error(`agentvm: ${shown}`);
  process.exit(1);
});
