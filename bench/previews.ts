/**
 * Preview URLs as a browser uses them: plain HTTP to the server's gateway at
 * the preview URL (`preview.url`, on the server's preview origin), which proxies into one port of one VM.
 *
 * Throughput runs the vmFetch bench's client loop (http.request, keep-alive
 * Agent, alternating rounds) against the gateway and against the baseline plain
 * Node server on 127.0.0.1 — and, when /usr/sbin/nginx exists, against nginx
 * proxying to that baseline server (nginx.ts). The download streams 1 GiB from a guest through the
 * gateway, through the client's vmFetchStream route, and through an embedded
 * VM's vmFetchReadable (this process is the server then), and samples the server
 * process's RSS every 100 ms: a proxy with working backpressure stays flat.
 *
 * The agentvm server runs in its own child process (server-process.ts), so the
 * RSS read is the server's alone.
 */
import { request } from "node:http";
import { join } from "node:path";
import { AgentVmError, createClient, type VmHandle } from "agentvm/client";
import { directFetcher, newKeepAliveAgent, startBaselineServer, startNodeServer } from "./baseline-server.ts";
import type { Vm } from "agentvm";
import { createBenchVm, GUEST_PORT, OK_SERVER } from "./guest.ts";
import type { FetchOnce } from "./load.ts";
import { nginxAvailable, startNginxProxy } from "./nginx.ts";
import { readRssKb } from "./procfs.ts";
import { startServerProcess, type BenchRegistry } from "./server-process.ts";
import { now, sampleEvery, sleep } from "./stats.ts";
import { compare, type ThroughputCase } from "./vm-fetch.ts";

const STREAM_PORT = 3001;
const CHUNK_BYTES = 64 * 1024;
const MB = 1024 * 1024;

/**
 * Streams `?chunks=N` × 64 KiB (default 16384 = 1 GiB) with backpressure: a
 * write that returns false waits for 'drain'. `listen` is the listen call.
 */
function streamServerSource(listen: string): string {
  return `
const http = require("node:http");
const chunk = Buffer.alloc(${CHUNK_BYTES}, 120);
const server = http.createServer((q, s) => {
  const chunks = Number(new URL(q.url, "http://localhost").searchParams.get("chunks") ?? 16384);
  s.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(chunks * chunk.length) });
  let sent = 0;
  const pump = () => {
    while (sent < chunks) {
      sent++;
      if (!s.write(chunk)) return void s.once("drain", pump);
    }
    s.end();
  };
  pump();
});
${listen};
`;
}

export interface DownloadResult {
  label: string;
  bytes: number;
  seconds: number;
  mbPerSecond: number;
  /** Serving process's VmRSS right before the transfer, MiB. */
  rssBeforeMb: number;
  /** Highest VmRSS sampled during the transfer (every 100 ms), MiB. */
  rssPeakMb: number;
  peakGrowthMb: number;
  samples: number;
}

export interface PreviewsResult {
  throughput: ThroughputCase[];
  /** nginx in front of the baseline server vs the baseline; empty when nginx is not installed. */
  nginx: ThroughputCase[];
  download: { baseline: DownloadResult; preview: DownloadResult; vmFetchStream: DownloadResult; vmFetchReadable: DownloadResult };
  downloadChunks: number;
}

export interface PreviewsOptions {
  dataDir: string;
  warmupMs: number;
  durationMs: number;
  rounds: number;
  concurrencies: readonly number[];
  /** 64 KiB chunks per download (16384 = 1 GiB). */
  downloadChunks: number;
  /** Unmeasured download first, per path (JIT, buffers). */
  warmupChunks: number;
  log(message: string): void;
}

export async function benchPreviews(options: PreviewsOptions): Promise<PreviewsResult> {
  const baseline = await startBaselineServer();
  const streamBaseline = await startNodeServer(streamServerSource(`server.listen(0, "127.0.0.1", () => console.log(server.address().port))`));
  const server = await startServerProcess(join(options.dataDir, "server-previews"));
  const embedded = await createBenchVm(options.dataDir, "bench-download");
  const agent = newKeepAliveAgent();
  try {
    await startEmbeddedStreamServer(embedded);
    const client = createClient<BenchRegistry>(`http://127.0.0.1:${server.port}`);
    const vm = client.vm.getOrCreate("bench-preview");
    await startServer(vm, "server.js", OK_SERVER, GUEST_PORT);
    await startServer(vm, "stream.js", streamServerSource(`server.listen(${STREAM_PORT})`), STREAM_PORT);
    const preview = await vm.createSignedPreviewUrl(GUEST_PORT);
    const streamPreview = await vm.createSignedPreviewUrl(STREAM_PORT);

    // Previews are served on their own origin (the preview listener), not the API's.
    const previewPort = Number(new URL(preview.url).port);
    const direct = directFetcher(agent, baseline.port);
    const viaPreview = directFetcher(agent, previewPort, preview.path);
    const throughput: ThroughputCase[] = [];
    for (const concurrency of options.concurrencies) {
      const label = concurrency === 1 ? "sequential" : `${concurrency} concurrent`;
      options.log(`preview gateway throughput, ${label}: ${options.rounds} alternating rounds per side`);
      throughput.push({ label, concurrency, ...(await compare(direct, viaPreview, concurrency, options)) });
    }
    const nginx = nginxAvailable() ? await nginxThroughput(baseline.port, direct, options) : [];

    const size = (chunks: number) => `?chunks=${chunks}`;
    const gib = ((options.downloadChunks * CHUNK_BYTES) / MB / 1024).toFixed(2).replace(/\.00$/, "");
    options.log(`download ${gib} GiB: baseline, preview gateway, client vmFetchStream, embedded vmFetchReadable`);
    const paths: [string, number, (chunks: number) => Promise<number>][] = [
      ["plain Node on 127.0.0.1", streamBaseline.pid, (chunks) => httpDownload(streamBaseline.port, `/${size(chunks)}`)],
      ["preview gateway", server.pid, (chunks) => httpDownload(previewPort, `${streamPreview.path}${size(chunks)}`)],
      ["client vmFetchStream", server.pid, (chunks) => streamDownload(vm, `/${size(chunks)}`)],
      ["embedded vmFetchReadable", process.pid, (chunks) => readableDownload(embedded, `/${size(chunks)}`)],
    ];
    const results: DownloadResult[] = [];
    for (const [label, pid, run] of paths) {
      await run(options.warmupChunks);
      results.push(await measureDownload(label, pid, options.downloadChunks, run));
      options.log(`download via ${label}: ${results.at(-1)!.mbPerSecond.toFixed(0)} MB/s, peak RSS growth ${results.at(-1)!.peakGrowthMb.toFixed(1)} MB`);
    }
    return { throughput, nginx, download: { baseline: results[0]!, preview: results[1]!, vmFetchStream: results[2]!, vmFetchReadable: results[3]! }, downloadChunks: options.downloadChunks };
  } finally {
    agent.destroy();
    await embedded.dispose();
    await server.stop();
    await streamBaseline.stop();
    await baseline.stop();
  }
}

/** nginx proxying to the baseline server, against the baseline server, in alternating rounds. */
async function nginxThroughput(baselinePort: number, direct: FetchOnce, options: PreviewsOptions): Promise<ThroughputCase[]> {
  const proxy = await startNginxProxy(baselinePort);
  const agent = newKeepAliveAgent();
  try {
    const viaNginx = directFetcher(agent, proxy.port);
    const cases: ThroughputCase[] = [];
    for (const concurrency of options.concurrencies) {
      const label = concurrency === 1 ? "sequential" : `${concurrency} concurrent`;
      options.log(`nginx proxy throughput, ${label}: ${options.rounds} alternating rounds per side`);
      cases.push({ label, concurrency, ...(await compare(direct, viaNginx, concurrency, options)) });
    }
    return cases;
  } finally {
    agent.destroy();
    await proxy.stop();
  }
}

/** Writes and spawns a guest server, then waits (through the client's vmFetch) until it answers. */
async function startServer(vm: VmHandle, file: string, source: string, port: number): Promise<void> {
  await vm.writeFile(`/home/agentos/${file}`, source);
  await vm.spawn("node", [file]);
  const deadline = now() + 10_000;
  for (;;) {
    try {
      const response = await vm.vmFetch(port, "/?chunks=1");
      if (response.status !== 200) throw new Error(`guest ${file} answered ${response.status}`);
      return;
    } catch (error) {
      if (!(error instanceof AgentVmError && error.code === "ECONNREFUSED") || now() > deadline) throw error;
      await sleep(5);
    }
  }
}

async function measureDownload(label: string, pid: number, chunks: number, run: (chunks: number) => Promise<number>): Promise<DownloadResult> {
  await sleep(200);
  const rssBefore = readRssKb(pid);
  const sampler = sampleEvery(100, () => readRssKb(pid));
  const started = now();
  const bytes = await run(chunks);
  const seconds = (now() - started) / 1000;
  const samples = sampler.stop();
  if (bytes !== chunks * CHUNK_BYTES) throw new Error(`download via ${label}: got ${bytes} bytes, expected ${chunks * CHUNK_BYTES}`);
  const peak = Math.max(...samples);
  return {
    label,
    bytes,
    seconds,
    mbPerSecond: bytes / MB / seconds,
    rssBeforeMb: rssBefore / 1024,
    rssPeakMb: peak / 1024,
    peakGrowthMb: (peak - rssBefore) / 1024,
    samples: samples.length,
  };
}

/** GET over a fresh connection, discarding the body; resolves to the bytes read. */
function httpDownload(port: number, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ agent: false, host: "127.0.0.1", port, path, headers: { host: `localhost:${port}` } });
    req.once("error", reject);
    req.once("response", (response) => {
      if (response.statusCode !== 200) return reject(new Error(`download ${path}: status ${response.statusCode}`));
      let bytes = 0;
      response.on("data", (chunk: Buffer) => (bytes += chunk.byteLength));
      response.once("end", () => resolve(bytes));
      response.once("error", reject);
    });
    req.end();
  });
}

/** The stream server in an embedded VM, waited for with vmFetch of one chunk. */
async function startEmbeddedStreamServer(vm: Vm): Promise<void> {
  await vm.writeFile("/home/agentos/stream.js", streamServerSource(`server.listen(${STREAM_PORT})`));
  await vm.spawn("node", ["stream.js"]);
  const deadline = now() + 10_000;
  for (;;) {
    try {
      const response = await vm.vmFetch(STREAM_PORT, "/?chunks=1");
      if (response.status !== 200) throw new Error(`embedded stream.js answered ${response.status}`);
      return;
    } catch (error) {
      if (!(error instanceof AgentVmError && error.code === "ECONNREFUSED") || now() > deadline) throw error;
      await sleep(5);
    }
  }
}

/** Vm.vmFetchReadable in this process: the body as a Node Readable, read to its end. */
async function readableDownload(vm: Vm, path: string): Promise<number> {
  const response = await vm.vmFetchReadable(STREAM_PORT, path);
  if (response.status !== 200) throw new Error(`vmFetchReadable ${path}: status ${response.status}`);
  let bytes = 0;
  for await (const chunk of response.body) bytes += (chunk as Buffer).byteLength;
  return bytes;
}

/** The client's vmFetchStream (the server's fetch route), reading the ReadableStream to its end. */
async function streamDownload(vm: VmHandle, path: string): Promise<number> {
  const response = await vm.vmFetchStream(STREAM_PORT, path);
  if (response.status !== 200) throw new Error(`vmFetchStream ${path}: status ${response.status}`);
  const reader = response.body.getReader();
  let bytes = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return bytes;
    bytes += value.byteLength;
  }
}
