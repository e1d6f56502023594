/**
 * Previews from any node: a cluster node's preview tokens end in `-<node>`, and
 * a node's gateway that gets a token naming another node passes the request to
 * that node's preview origin. Where each node's preview origin is comes from the
 * engine (each node publishes it as the metadata of a runner config named
 * `agentvm-address.<node>`), never from the
 * request, so a crafted token cannot send the gateway anywhere else. The owning
 * node checks the token itself: expiry and revocation stay exact.
 *
 * Plain HTTP requests are forwarded as HTTP; WebSocket (and other) upgrades
 * as the request head followed by a byte relay, both ways.
 */
import { request as httpRequest, type IncomingMessage, type ServerResponse } from "node:http";
import { connect } from "node:net";
import { pipeline, type Duplex } from "node:stream";
import { NODE_ADDRESS_PREFIX } from "./config.ts";

/** How long the engine's list of node addresses is reused. */
const DIRECTORY_TTL_MS = 5_000;

export interface NodeAddresses {
  url: string;
  previewUrl: string;
}

interface RunnerConfigs {
  runner_configs: Record<string, { datacenters: Record<string, { metadata?: { agentvm?: Partial<NodeAddresses> } }> }>;
}

export class NodeDirectory {
  readonly #engine: string;
  readonly #token: string | undefined;
  #cached: { at: number; nodes: Promise<Map<string, NodeAddresses>> } | undefined;

  constructor(engine: string, token: string | undefined) {
    this.#engine = engine;
    this.#token = token;
  }

  async lookup(node: string): Promise<NodeAddresses | undefined> {
    if (!this.#cached || Date.now() - this.#cached.at > DIRECTORY_TTL_MS) {
      const nodes = this.#load();
      this.#cached = { at: Date.now(), nodes };
      nodes.catch(() => (this.#cached = undefined));
    }
    return (await this.#cached.nodes).get(node);
  }

  async #load(): Promise<Map<string, NodeAddresses>> {
    const response = await fetch(`${this.#engine}/runner-configs?namespace=default`, {
      headers: this.#token ? { authorization: `Bearer ${this.#token}` } : {},
      signal: AbortSignal.timeout(5_000),
    });
    const body = (await response.json()) as RunnerConfigs;
    const nodes = new Map<string, NodeAddresses>();
    for (const [pool, config] of Object.entries(body.runner_configs ?? {})) {
      if (!pool.startsWith(NODE_ADDRESS_PREFIX)) continue;
      for (const datacenter of Object.values(config.datacenters)) {
        const addresses = datacenter.metadata?.agentvm;
        if (typeof addresses?.url === "string" && typeof addresses.previewUrl === "string") {
          nodes.set(pool.slice(NODE_ADDRESS_PREFIX.length), { url: addresses.url, previewUrl: addresses.previewUrl });
        }
      }
    }
    return nodes;
  }
}

/** Passes one preview request to the owning node's preview origin; false when that node is unknown. */
export async function forwardPreview(directory: NodeDirectory, owner: string, request: IncomingMessage, response: ServerResponse): Promise<boolean> {
  const addresses = await directory.lookup(owner).catch(() => undefined);
  if (!addresses) return false;
  const target = new URL(addresses.previewUrl);
  await new Promise<void>((done) => {
    const upstream = httpRequest(
      {
        host: target.hostname,
        port: target.port,
        method: request.method,
        path: request.url,
        // The Host the browser used is kept: the owner's gateway reads the token from it in
        // subdomain mode, and builds redirects on it.
        headers: request.headers,
      },
      (answer) => {
        response.writeHead(answer.statusCode ?? 502, answer.statusMessage, answer.headers);
        pipeline(answer, response, () => done());
      },
    );
    upstream.once("error", () => {
      if (!response.headersSent) {
        response.writeHead(502, { "content-type": "text/plain; charset=utf-8" });
        response.end(`The node ${owner} that holds this preview's VM did not answer; try again once it is back.\n`);
      } else response.destroy();
      done();
    });
    response.once("close", () => upstream.destroy());
    pipeline(request, upstream, () => undefined);
  });
  return true;
}

/**
 * Passes one preview upgrade (a WebSocket) to the owning node's preview
 * origin: its request head as the browser sent it, then bytes both ways until
 * either side closes. False when that node is unknown.
 */
export async function forwardPreviewUpgrade(directory: NodeDirectory, owner: string, request: IncomingMessage, socket: Duplex, head: Buffer): Promise<boolean> {
  const addresses = await directory.lookup(owner).catch(() => undefined);
  if (!addresses) return false;
  const target = new URL(addresses.previewUrl);
  const upstream = connect({ host: target.hostname, port: Number(target.port) });
  let connected = false;
  const finish = () => {
    upstream.destroy();
    socket.destroy();
  };
  upstream.once("connect", () => {
    connected = true;
    // Node's parser refused any header with CR or LF, so the head is rebuilt as sent.
    const lines = [`${request.method} ${request.url} HTTP/1.1`];
    for (let i = 0; i < request.rawHeaders.length; i += 2) lines.push(`${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}`);
    upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
    if (head.byteLength > 0) upstream.write(head);
    upstream.pipe(socket);
    socket.pipe(upstream);
  });
  upstream.on("error", () => {
    if (connected) return finish();
    const body = `The node ${owner} that holds this preview's VM did not answer; try again once it is back.\n`;
    socket.end(`HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
  });
  upstream.once("close", () => connected && finish());
  socket.once("close", finish);
  return true;
}
