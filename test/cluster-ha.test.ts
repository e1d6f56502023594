/**
 * The HA engine with real parts on loopback: a throwaway PostgreSQL and a
 * nats-server, two `agentvm engine`s on them (--postgres, --nats), nginx as the
 * TCP load balancer in front of both (as a user would put one), and one
 * `agentvm node` and the clients on the balancer's address only.
 *
 * The node starts while only engine 0 runs, so its runner is connected to
 * engine 0; engine 1 starts next. Engine 0 is then killed with SIGKILL: the
 * runner reconnects through the balancer to engine 1 by itself, and the VM
 * still answers through the balancer (locate and actions, from a fresh client),
 * a new key is still placed, and files are intact. Engine 0 then comes back and
 * the engines serve as before.
 *
 * How long that takes depends on which engine held the VM's workflows: Rivet
 * Engine 2.3.19 hands a dead engine's workflows to another only once their
 * leases expire (a fixed 30 s), so waits here allow 60 s.
 *
 * Skipped, saying why, without the cluster runtime, PostgreSQL's server
 * binaries, nats-server, or nginx with its stream module (`.ci/run` installs
 * them: Debian packages postgresql, nats-server, nginx, libnginx-mod-stream).
 */
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { chown, mkdtemp, readFile, realpath, rm, writeFile } from "node:fs/promises";
import { existsSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import type { Registry, VmDefinition } from "agentvm";
import { createClient as createAnyClient } from "agentvm/client";
import { clusterRuntimeInstalled } from "../src/cluster/rivetkit.ts";
import { unmountUnder, waitFor } from "./helpers.ts";
import { AgentvmCommand as Command, Daemon, freePorts, listening, untilAnswered } from "./cluster-support.ts";

const createClient = (endpoint: string) => createAnyClient<Registry<{ vm: VmDefinition }>>(endpoint);
const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** The newest PostgreSQL server binaries Debian installed (/usr/lib/postgresql/<version>/bin). */
function postgresBin(): string | undefined {
  const root = "/usr/lib/postgresql";
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root).filter((version) => existsSync(join(root, version, "bin/postgres")) && existsSync(join(root, version, "bin/initdb")));
  versions.sort((a, b) => Number(b) - Number(a));
  return versions[0] === undefined ? undefined : join(root, versions[0], "bin");
}
function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/usr/bin"])) if (dir && existsSync(join(dir, name))) return join(dir, name);
  return undefined;
}
/** Debian builds nginx's stream (TCP) module as a loadable module; other builds may have it built in. */
const STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so";

/** nginx with its stream module: Debian's loadable one, or built in (`nginx -V` then lists --with-stream without =dynamic). */
function nginxWithStream(): string | undefined {
  const nginx = onPath("nginx");
  if (!nginx) return undefined;
  if (existsSync(STREAM_MODULE)) return nginx;
  const built = spawnSync(nginx, ["-V"], { encoding: "utf8", timeout: 5_000 });
  return /--with-stream(\s|$)/.test(`${built.stdout}${built.stderr}`) ? nginx : undefined;
}

const PG_BIN = postgresBin();
const NATS = onPath("nats-server");
const NGINX = nginxWithStream();
const skip = !clusterRuntimeInstalled()
  ? "the cluster runtime is not installed (npm run cluster:install); HA engine test skipped"
  : !PG_BIN
    ? "PostgreSQL's server binaries are not installed (apt-get install postgresql); HA engine test skipped"
    : !NATS
      ? "nats-server is not installed (apt-get install nats-server); HA engine test skipped"
      : !NGINX
        ? "nginx with its stream module is not installed (apt-get install nginx libnginx-mod-stream); HA engine test skipped"
        : false;

describe("cluster: two engines on PostgreSQL + NATS behind nginx survive losing one", { skip }, () => {
  let dir: string;
  let balancer: string;
  let node: Command;
  const daemons: Daemon[] = [];
  const engines: { command: Command | undefined; port: number; args: string[] }[] = [];

  const startEngine = async (index: number) => {
    const { port, args } = engines[index]!;
    const command = new Command(args);
    engines[index]!.command = command;
    await command.ready(/Ctrl-C stops the engine/, 40_000);
    assert.ok(await listening(port), `engine ${index} listens on ${port}`);
  };
  const enginePid = (command: Command | undefined) => Number(/\(pid (\d+);/.exec(command?.output ?? "")?.[1]);

  before(async () => {
    dir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-cluster-ha-")));
    // PostgreSQL refuses to run as root: when the test is root, it runs as nobody.
    const user = process.getuid?.() === 0 ? { uid: 65534, gid: 65534 } : undefined;
    const pgData = join(dir, "pg");
    if (user) await chown(dir, user.uid, user.gid);
    await promisify(execFile)(join(PG_BIN!, "initdb"), ["-D", pgData, "-U", "rivet", "--auth=trust", "-E", "UTF8", "--no-sync"], { timeout: 30_000, ...(user ?? {}) });
    const pgPort = await freePorts(1);
    const postgres = new Daemon("postgres", join(PG_BIN!, "postgres"), ["-D", pgData, "-p", String(pgPort), "-h", "127.0.0.1", "-k", dir, "-c", "fsync=off"], { user });
    daemons.push(postgres);
    const natsPort = await freePorts(1);
    const nats = new Daemon("nats-server", NATS!, ["-a", "127.0.0.1", "-p", String(natsPort)]);
    daemons.push(nats);
    await Promise.all([postgres.ready(/database system is ready to accept connections/), nats.ready(/Server is ready/)]);
    await promisify(execFile)(join(PG_BIN!, "createdb"), ["-h", "127.0.0.1", "-p", String(pgPort), "-U", "rivet", "rivet"], { timeout: 10_000 });

    // The balancer forwards its port to every engine's gateway and the next port to their peer APIs.
    const balancerPort = await freePorts(2);
    balancer = `http://127.0.0.1:${balancerPort}`;
    const shared = ["--postgres", `postgresql://rivet@127.0.0.1:${pgPort}/rivet`, "--nats", `nats://127.0.0.1:${natsPort}`, "--public-url", balancer];
    for (const index of [0, 1]) {
      const port = await freePorts(3);
      engines.push({ command: undefined, port, args: ["engine", "--port", String(port), "--data-dir", join(dir, `engine-${index}`), ...shared] });
    }
    // Engine 0 alone first: it creates the database's schema, and the node's runner connects to it.
    await startEngine(0);

    const upstream = (offset: number) => engines.map(({ port }) => `    server 127.0.0.1:${port + offset} max_fails=1 fail_timeout=2s;`).join("\n");
    await writeFile(
      join(dir, "nginx.conf"),
      `${existsSync(STREAM_MODULE) ? `load_module ${STREAM_MODULE};\n` : ""}daemon off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/nginx-error.log notice;
events { worker_connections 512; }
stream {
  upstream engines {\n${upstream(0)}\n  }
  upstream engine_peers {\n${upstream(1)}\n  }
  server { listen 127.0.0.1:${balancerPort}; proxy_pass engines; proxy_connect_timeout 2s; }
  server { listen 127.0.0.1:${balancerPort + 1}; proxy_pass engine_peers; proxy_connect_timeout 2s; }
}
`,
    );
    const nginx = new Daemon("nginx", NGINX!, ["-p", dir, "-e", join(dir, "nginx-error.log"), "-c", join(dir, "nginx.conf")]);
    daemons.push(nginx);
    await nginx.ready(() => listening(balancerPort));

    const nodePort = await freePorts(2);
    node = new Command(["node", "--engine", balancer, "--name", "a", "--port", String(nodePort), "--data-dir", join(dir, "node-a")]);
    await node.ready(/Joined the engine/);
    // The runner connects a moment after "Joined": wait for it (on engine 0, the only one up) before engine 1 starts.
    await waitFor(async () => {
      const response = await fetch(`${balancer}/envoys?namespace=default`, { signal: AbortSignal.timeout(5_000) });
      const { envoys } = (await response.json()) as { envoys: { pool_name: string; stop_ts: number | null }[] };
      return envoys.some((envoy) => envoy.pool_name === "agentvm.a" && envoy.stop_ts === null);
    }, "node a's runner to connect to engine 0", 20_000, 100);
    await startEngine(1);
  });

  after(async () => {
    await node?.stop();
    for (const { command } of engines) await command?.stop();
    for (const daemon of daemons.reverse()) await daemon.stop(daemon.name === "postgres" ? "SIGINT" : "SIGTERM");
    if (dir) {
      await unmountUnder(dir);
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("a VM created through the balancer answers, a new key is placed and files stay after the node's engine is SIGKILLed", async () => {
    const vm = createClient(balancer).vm.getOrCreate("ha-before");
    await untilAnswered("the first VM", () => vm.writeFile("/home/agentos/before.txt", "written before the engine died"));
    assert.ok(existsSync(join(dir, "node-a", "vms", "ha-before")), "the VM lives on the node");

    const victim = engines[0]!.command!;
    const pid = enginePid(victim);
    assert.ok(pid > 0, `engine 0 printed its pid:\n${victim.output}`);
    const killedAt = Date.now();
    process.kill(pid, "SIGKILL");
    // `agentvm engine` ends when its engine does.
    await waitFor(() => victim.child.exitCode !== null, "agentvm engine 0 to exit after its engine was killed", 10_000, 50);

    // Locate + action from a client that never saw the VM.
    const read = await untilAnswered("the VM through the balancer after engine 0 was killed", () => createClient(balancer).vm.getOrCreate("ha-before").readFile("/home/agentos/before.txt"));
    console.log(`# engine 0 killed: a fresh client located the VM and read its file after ${Date.now() - killedAt} ms`);
    assert.equal(decode(read), "written before the engine died");
    // A key the engines never saw is placed on the node.
    const fresh = createClient(balancer).vm.getOrCreate("ha-after");
    await untilAnswered("a new key after engine 0 was killed", () => fresh.writeFile("/home/agentos/after.txt", "ha-after"));
    console.log(`# engine 0 killed: a new key was placed after ${Date.now() - killedAt} ms`);
    assert.equal(decode(await fresh.readFile("/home/agentos/after.txt")), "ha-after");
    assert.ok(existsSync(join(dir, "node-a", "vms", "ha-after")), "the new VM lives on the node");
    // The handle that located before the loss keeps working too.
    assert.equal(decode(await vm.readFile("/home/agentos/before.txt")), "written before the engine died");

    // Engine 0 back: both engines serve; every key is found from a fresh client.
    await startEngine(0);
    for (const [key, path, text] of [["ha-before", "before.txt", "written before the engine died"], ["ha-after", "after.txt", "ha-after"]] as const) {
      assert.equal(decode(await untilAnswered(`${key} after engine 0 came back`, () => createClient(balancer).vm.getOrCreate(key).readFile(`/home/agentos/${path}`))), text);
    }
    const rss = await Promise.all(engines.map(async ({ command }) => /VmRSS:\s+(\d+) kB/.exec(await readFile(`/proc/${enginePid(command)}/status`, "utf8"))?.[1]));
    console.log(`# engine RSS on PostgreSQL + NATS: ${rss.map((kb) => `${Math.round(Number(kb) / 1024)} MB`).join(", ")}`);
  });
});
