/**
 * Cluster figures (docs/cluster.md), run by hand: `npm run bench:cluster`.
 * Not part of `npm run bench`: it starts an engine, two nodes and a single-node
 * server as processes and takes about a minute. Needs `npm run cluster:install`.
 *
 * - action latency (p50 of a small action): single-node; cluster client (the
 *   client locates once through the engine, then calls the node); the same
 *   action through the engine's gateway; a cold locate through the engine
 * - a state-changing action (createSignedPreviewUrl): single-node vs cluster,
 *   where the VM's state is also saved in the engine before the call returns
 * - vmFetch and preview streaming throughput, 256 MiB: single-node vs the
 *   located node, and a preview through the other node's gateway
 * - a killed node's VM answering again after the node is restarted
 * - resident memory at rest: engine, node, single-node server
 */
import { readFileSync } from "node:fs";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Registry, VmDefinition } from "../src/index.ts";
import { createClient, type VmHandle } from "../src/client/index.ts";
import { clusterRuntimeInstalled } from "../src/cluster/rivetkit.ts";
import { AgentvmCommand, freePorts } from "../test/cluster-support.ts";
import { unmountUnder } from "../test/helpers.ts";

type R = Registry<{ vm: VmDefinition }>;
const STREAM_MIB = 256;
const CALLS = 200;

if (!clusterRuntimeInstalled()) {
  console.error("bench:cluster needs the cluster runtime: npm run cluster:install");
  process.exit(1);
}

const rssMb = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) / 1024;
const p50 = (values: number[]) => values.sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

async function latency(call: () => Promise<unknown>): Promise<number> {
  for (let index = 0; index < 20; index++) await call();
  const times: number[] = [];
  for (let index = 0; index < CALLS; index++) {
    const start = performance.now();
    await call();
    times.push(performance.now() - start);
  }
  return p50(times);
}

const GUEST = `const chunk = Buffer.alloc(1 << 20, 97);
require("http").createServer((req, res) => {
  res.writeHead(200, { "content-type": "application/octet-stream" });
  let left = ${STREAM_MIB};
  const more = () => { while (left > 0) { left--; if (!res.write(chunk)) return res.once("drain", more); } res.end(); };
  more();
}).listen(3000);`;

async function startGuest(vm: VmHandle): Promise<void> {
  await vm.writeFile("/home/agentos/stream.js", GUEST);
  await vm.spawn("node", ["/home/agentos/stream.js"]);
  for (let attempt = 0; attempt < 500; attempt++) {
    try {
      if ((await vm.listeningPorts()).includes(3000)) return;
    } catch {
      // the VM is still starting
    }
    await new Promise((done) => setTimeout(done, 20));
  }
  throw new Error("guest server did not listen");
}

type Open = () => Promise<AsyncIterable<Uint8Array>>;

/** MiB/s of reading one whole streamed body. */
async function once(open: Open): Promise<number> {
  const start = performance.now();
  let bytes = 0;
  for await (const chunk of await open()) bytes += chunk.byteLength;
  if (bytes !== STREAM_MIB * 2 ** 20) throw new Error(`streamed ${bytes} bytes, expected ${STREAM_MIB} MiB`);
  return bytes / 2 ** 20 / ((performance.now() - start) / 1000);
}

/** Best of four rounds each, taken in turns, so a busy moment of this shared machine does not favour one side. */
async function compare(...opens: Open[]): Promise<number[]> {
  const best = opens.map(() => 0);
  for (let round = 0; round < 4; round++) {
    for (const [index, open] of opens.entries()) best[index] = Math.max(best[index]!, await once(open));
  }
  return best;
}

const viaVmFetch = (vm: VmHandle): Open => async () => (await vm.vmFetchStream(3000, "/")).body;
const viaPreview =
  (url: string): Open =>
  async () => {
    const response = await fetch(url);
    if (!response.ok || !response.body) throw new Error(`preview ${response.status}`);
    return response.body;
  };

const dir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-bench-cluster-")));
const started: AgentvmCommand[] = [];
try {
  const enginePort = await freePorts(3);
  const engine = new AgentvmCommand(["engine", "--port", String(enginePort), "--data-dir", join(dir, "engine")]);
  started.push(engine);
  await engine.ready(/Ctrl-C stops the engine/);
  const engineUrl = `http://127.0.0.1:${enginePort}`;
  const nodes: Record<string, { command: AgentvmCommand; port: number }> = {};
  const startNode = async (name: string, port: number) => {
    const command = new AgentvmCommand(["node", "--engine", engineUrl, "--name", name, "--port", String(port), "--data-dir", join(dir, name)]);
    started.push(command);
    nodes[name] = { command, port };
    await command.ready(/Joined the engine/);
  };
  await Promise.all([startNode("a", await freePorts(2)), startNode("b", await freePorts(2))]);
  const singlePort = await freePorts(2);
  const single = new AgentvmCommand(["start", "--port", String(singlePort), "--host", "127.0.0.1", "--data-dir", join(dir, "single")]);
  started.push(single);
  await single.ready(/Ctrl-C stops the server/, 120_000);

  await new Promise((done) => setTimeout(done, 2_000));
  const memory = { engine: rssMb(engine.child.pid!), nodeA: rssMb(nodes.a!.command.child.pid!), single: rssMb(single.child.pid!) };

  const singleVm = createClient<R>(`http://127.0.0.1:${singlePort}`).vm.getOrCreate("bench");
  const clusterClient = createClient<R>(engineUrl);
  const clusterVm = clusterClient.vm.getOrCreate("bench");
  await singleVm.writeFile("/home/agentos/a.txt", "x");
  await clusterVm.writeFile("/home/agentos/a.txt", "x");

  const singleMs = await latency(() => singleVm.stat("/home/agentos/a.txt"));
  const clusterMs = await latency(() => clusterVm.stat("/home/agentos/a.txt"));
  const actorId = ((await (await fetch(`${engineUrl}/actors?namespace=default&name=vm&key=bench`)).json()) as { actors: { actor_id: string }[] }).actors[0]!.actor_id;
  const gatewayMs = await latency(async () => {
    const response = await fetch(`${engineUrl}/gateway/${actorId}/action/stat`, { method: "POST", headers: { "x-rivet-encoding": "json", "content-type": "application/json" }, body: JSON.stringify({ args: ["/home/agentos/a.txt"] }) });
    if (!response.ok) throw new Error(`gateway ${response.status}`);
    await response.text();
  });
  const locates: number[] = [];
  for (let index = 0; index < 30; index++) {
    const start = performance.now();
    await createClient<R>(engineUrl).vm.getOrCreate("bench").stat("/home/agentos/a.txt");
    locates.push(performance.now() - start);
  }

  const singlePreviewMs = await latency(() => singleVm.createSignedPreviewUrl(3000, 60));
  const clusterPreviewMs = await latency(() => clusterVm.createSignedPreviewUrl(3000, 60));
  await singleVm.expireAllPreviewUrls();
  await clusterVm.expireAllPreviewUrls();

  await startGuest(singleVm);
  await startGuest(clusterVm);
  const [singleMiBs, clusterMiBs] = (await compare(viaVmFetch(singleVm), viaVmFetch(clusterVm))) as [number, number];
  const singlePreview = await singleVm.createSignedPreviewUrl(3000, 600);
  const clusterPreview = await clusterVm.createSignedPreviewUrl(3000, 600);
  const owner = clusterPreview.token.endsWith("-a") ? "a" : "b";
  const otherGateway = `http://127.0.0.1:${nodes[owner === "a" ? "b" : "a"]!.port + 1}`;
  const [singlePreviewMiBs, clusterPreviewMiBs, forwardedPreviewMiBs] = (await compare(
    viaPreview(singlePreview.url!),
    viaPreview(clusterPreview.url!),
    viaPreview(`${otherGateway}${clusterPreview.path}`),
  )) as [number, number, number];

  // Failover: a VM on node a, node a killed and restarted.
  let onA: VmHandle | undefined;
  for (let index = 0; index < 16 && !onA; index++) {
    const vm = clusterClient.vm.getOrCreate(`failover-${index}`);
    await vm.writeFile("/home/agentos/f.txt", "kept");
    const location = await fetch(`${engineUrl}/actors?namespace=default&name=vm&key=failover-${index}`).then((r) => r.json() as Promise<{ actors: { runner_name_selector: string }[] }>);
    if (location.actors[0]!.runner_name_selector === "agentvm.a") onA = vm;
  }
  await nodes.a!.command.stop("SIGKILL");
  const restart = performance.now();
  await startNode("a", nodes.a!.port);
  const nodeUp = performance.now() - restart;
  let answeredMs = NaN;
  while (performance.now() - restart < 60_000) {
    try {
      await createClient<R>(engineUrl).vm.getOrCreate(onA!.key).readFile("/home/agentos/f.txt");
      answeredMs = performance.now() - restart;
      break;
    } catch {
      await new Promise((done) => setTimeout(done, 100));
    }
  }

  const rows = [
    ["action p50 (stat), single-node", `${singleMs.toFixed(2)} ms`],
    ["action p50, cluster client (located node)", `${clusterMs.toFixed(2)} ms`],
    ["action p50, through the engine gateway", `${gatewayMs.toFixed(2)} ms`],
    ["first call of a new client (locate + action), p50", `${p50(locates).toFixed(1)} ms`],
    [`vmFetch stream ${STREAM_MIB} MiB, single-node`, `${singleMiBs.toFixed(0)} MiB/s`],
    [`vmFetch stream ${STREAM_MIB} MiB, located node`, `${clusterMiBs.toFixed(0)} MiB/s (ratio ${(clusterMiBs / singleMiBs).toFixed(2)})`],
    ["createSignedPreviewUrl p50, single-node", `${singlePreviewMs.toFixed(2)} ms`],
    ["createSignedPreviewUrl p50, cluster (saved in the engine too)", `${clusterPreviewMs.toFixed(2)} ms`],
    [`preview stream ${STREAM_MIB} MiB, single-node`, `${singlePreviewMiBs.toFixed(0)} MiB/s`],
    [`preview stream ${STREAM_MIB} MiB, owning node`, `${clusterPreviewMiBs.toFixed(0)} MiB/s (ratio ${(clusterPreviewMiBs / singlePreviewMiBs).toFixed(2)})`],
    [`preview stream ${STREAM_MIB} MiB, through the other node's gateway`, `${forwardedPreviewMiBs.toFixed(0)} MiB/s (ratio ${(forwardedPreviewMiBs / singlePreviewMiBs).toFixed(2)})`],
    ["killed node restarted: node ready", `${(nodeUp / 1000).toFixed(1)} s`],
    ["killed node restarted: its VM answers", `${(answeredMs / 1000).toFixed(1)} s after restart`],
    ["RSS at rest: engine", `${memory.engine.toFixed(0)} MB`],
    ["RSS at rest: node (server + runner)", `${memory.nodeA.toFixed(0)} MB`],
    ["RSS at rest: single-node server (1 demo VM)", `${memory.single.toFixed(0)} MB`],
  ];
  const width = Math.max(...rows.map(([name]) => name!.length));
  for (const [name, value] of rows) console.log(`${name!.padEnd(width)}  ${value}`);
} finally {
  for (const command of started.reverse()) await command.stop();
  // The node killed above leaves its VMs' disks mounted.
  await unmountUnder(dir);
  await rm(dir, { recursive: true, force: true });
}
