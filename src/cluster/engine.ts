/**
 * `agentvm engine`: runs the Rivet Engine from npm with a configuration we
 * write, never its defaults (which bind every interface, send telemetry and take
 * port 6420). The engine is our child and must not outlive us: it starts under
 * `setpriv --pdeathsig SIGKILL` (the kernel kills it when we die, even by
 * SIGKILL), and we also kill it on exit and on SIGINT/SIGTERM.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { AgentVmError } from "../errors.ts";
import { PEGBOARD_TIMEOUTS, type EngineOptions } from "./config.ts";
import { engineBinaryPath } from "./rivetkit.ts";

export interface RunningEngine {
  readonly url: string;
  readonly pid: number;
  readonly configPath: string;
  readonly exited: Promise<number | null>;
  stop(): Promise<void>;
}

/**
 * The engine's configuration: loopback or a private address, its own ports,
 * telemetry off, short failover timeouts; state in RocksDB under the data
 * directory, or in PostgreSQL + NATS shared with other engines.
 *
 * Engines on the same shared state are one datacenter: everything here except
 * the listen addresses must be the same on each (the topology, the timeouts,
 * the admin token), which is why the topology is derived from the public URL
 * (the balancer) and not from the engine's own address. Rivet Engine 2.3.19
 * needs no per-engine identity: its workers register themselves in the
 * database.
 */
export function engineConfig(options: EngineOptions): Record<string, unknown> {
  const host = options.host === "localhost" ? "127.0.0.1" : options.host;
  const publicUrl = new URL(options.publicUrl);
  // The peer API sits on the port after the gateway, behind the balancer as on each engine.
  const peerUrl = new URL(publicUrl);
  peerUrl.port = String(Number(publicUrl.port || (publicUrl.protocol === "https:" ? 443 : 80)) + 1);
  return {
    guard: { host, port: options.port },
    api_peer: { host, port: options.port + 1 },
    metrics: { host, port: options.port + 2 },
    ...(options.shared
      ? { postgres: { url: options.shared.postgres }, nats: { addresses: options.shared.nats } }
      : { file_system: { path: join(options.dataDir, "db") } }),
    telemetry: { enabled: false },
    pegboard: { ...PEGBOARD_TIMEOUTS },
    topology: { datacenter_label: 1, datacenters: { default: { datacenter_label: 1, is_leader: true, peer_url: peerUrl.origin, public_url: publicUrl.origin } } },
    ...(options.token ? { auth: { admin_token: options.token } } : {}),
  };
}

export async function startEngine(options: EngineOptions, { startTimeoutMs = 30_000 }: { startTimeoutMs?: number } = {}): Promise<RunningEngine> {
  const binary = engineBinaryPath();
  mkdirSync(options.dataDir, { recursive: true, mode: 0o700 });
  const configPath = join(options.dataDir, "engine-config.json");
  writeFileSync(configPath, `${JSON.stringify(engineConfig(options), null, 2)}\n`, { mode: 0o600 });
  const url = `http://${options.host.includes(":") ? `[${options.host}]` : options.host}:${options.port}`;
  // Something already answering there would make our health check pass for the wrong process.
  if (await healthy(url)) throw new AgentVmError("EADDRINUSE", `something already answers on ${url}; stop it or pass --port`);

  const command = existsSync("/usr/bin/setpriv") ? ["/usr/bin/setpriv", "--pdeathsig", "SIGKILL", "--", binary] : [binary];
  const child = spawn(command[0]!, [...command.slice(1), "start", "--config", configPath], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: options.dataDir, RUST_LOG: process.env.RUST_LOG ?? "warn", RUST_LOG_ANSI_COLOR: "0" },
  });
  const log = [] as string[];
  const keep = (chunk: Buffer) => {
    log.push(chunk.toString());
    if (log.length > 50) log.shift();
    if (process.env.AGENTVM_ENGINE_LOG === "1") process.stderr.write(chunk);
  };
  child.stdout!.on("data", keep);
  child.stderr!.on("data", keep);
  const exited = new Promise<number | null>((done) => child.once("exit", (code) => done(code)));
  const kill = () => child.kill("SIGKILL");
  process.once("exit", kill);

  const deadline = Date.now() + startTimeoutMs;
  while (!(await healthy(url))) {
    if (child.exitCode !== null || child.signalCode !== null) {
      process.off("exit", kill);
      throw new AgentVmError("CLUSTER_UNAVAILABLE", `the Rivet Engine exited during start-up (${child.exitCode ?? child.signalCode}):\n${log.join("").slice(-2000)}`);
    }
    if (Date.now() > deadline) {
      kill();
      process.off("exit", kill);
      throw new AgentVmError("CLUSTER_UNAVAILABLE", `the Rivet Engine did not answer on ${url}/health within ${startTimeoutMs} ms:\n${log.join("").slice(-2000)}`);
    }
    await new Promise((done) => setTimeout(done, 100));
  }
  return {
    url,
    pid: child.pid!,
    configPath,
    exited,
    async stop() {
      process.off("exit", kill);
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const timer = setTimeout(kill, 5_000);
        await exited;
        clearTimeout(timer);
      }
    },
  };
}

async function healthy(url: string): Promise<boolean> {
  try {
    const response = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1_000) });
    const body = (await response.json()) as { runtime?: string; status?: string };
    return body.runtime === "engine" && body.status === "ok";
  } catch {
    return false;
  }
}
