/**
 * Previews from any node: a cluster node's preview tokens end in `-<node>`, and
 * a node's gateway that gets a token naming another node passes the request to
 * that node's preview origin. Where each node's preview origin is comes from the
 * engine (each node publishes it as the metadata of a runner config named
 * `agentvm-address.<node>`), never from the
 * request, so a crafted token cannot send the gateway anywhere else. The owning
 * node checks the token itself: expiry and revocation stay exact.
 *
 * Plain HTTP requests are forwarded as HTTP(S); WebSocket (and other) upgrades
 * as the request head followed by a byte relay, both ways. Where the owner is
 * reached, and what an engine failure means, is decided in preview-target.ts.
 */
import { request as httpRequest, type IncomingMessage, type ServerResponse } from "node:http";
import { request as httpsRequest } from "node:https";
import { connect, isIP } from "node:net";
import { pipeline, type Duplex } from "node:stream";
import { connect as tlsConnect } from "node:tls";
import { AgentVmError } from "../errors.ts";
import { rawErrorResponse } from "../server/connection-guard.ts";
import { sendError } from "../server/http-api.ts";
import { NODE_ADDRESS_PREFIX } from "./config.ts";
import { locateOwner, type PreviewTarget } from "./preview-target.ts";

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
    // An error status is the engine failing, not an empty list: it must not read as "no such node".
    if (!response.ok) throw new Error(`GET /runner-configs answered ${response.status}`);
    const body = (await response.json()) as RunnerConfigs;
    const nodes = new Map<string, NodeAddresses>();
    if (typeof body?.runner_configs !== "object" || body.runner_configs === null) throw new Error("GET /runner-configs answered without runner_configs");
    for (const [pool, config] of Object.entries(body.runner_configs)) {
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

/** Passes one preview request to the owning node's preview origin; false when the engine lists no such node. */
export async function forwardPreview(directory: NodeDirectory, owner: string, request: IncomingMessage, response: ServerResponse): Promise<boolean> {
  const located = await locateOwner(owner, (name) => directory.lookup(name));
  if (located.kind === "unknown") return false;
  if (located.kind === "unavailable") {
    sendError(response, located.error);
    return true;
  }
  const target = located.target;
  await new Promise<void>((done) => {
    const options = {
      host: target.host,
      port: target.port,
      method: request.method,
      path: request.url,
      // The Host the browser used is kept: the owner's gateway reads the token from it in
      // subdomain mode, and builds redirects on it. TLS names the owner's own address.
      headers: request.headers,
      ...(target.tls ? { servername: tlsServerName(target) } : {}),
    };
    const onAnswer = (answer: IncomingMessage) => {
      response.writeHead(answer.statusCode ?? 502, answer.statusMessage, answer.headers);
      pipeline(answer, response, () => done());
    };
    const upstream = target.tls ? httpsRequest(options, onAnswer) : httpRequest(options, onAnswer);
    upstream.once("error", (error) => {
      if (!response.headersSent) sendError(response, notAnswering(owner, target, error));
      else response.destroy();
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
 * either side closes. False when the engine lists no such node.
 */
export async function forwardPreviewUpgrade(directory: NodeDirectory, owner: string, request: IncomingMessage, socket: Duplex, head: Buffer): Promise<boolean> {
  const located = await locateOwner(owner, (name) => directory.lookup(name));
  if (located.kind === "unknown") return false;
  if (located.kind === "unavailable") {
    socket.end(rawErrorResponse(located.error.code, located.error.message));
    return true;
  }
  const target = located.target;
  const upstream = target.tls ? tlsConnect({ host: target.host, port: target.port, servername: tlsServerName(target) }) : connect({ host: target.host, port: target.port });
  let connected = false;
  const finish = () => {
    upstream.destroy();
    socket.destroy();
  };
  upstream.once(target.tls ? "secureConnect" : "connect", () => {
    connected = true;
    // Node's parser refused any header with CR or LF, so the head is rebuilt as sent.
    const lines = [`${request.method} ${request.url} HTTP/1.1`];
    for (let i = 0; i < request.rawHeaders.length; i += 2) lines.push(`${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}`);
    upstream.write(`${lines.join("\r\n")}\r\n\r\n`);
    if (head.byteLength > 0) upstream.write(head);
    upstream.pipe(socket);
    socket.pipe(upstream);
  });
  upstream.on("error", (error) => {
    if (connected) return finish();
    const shaped = notAnswering(owner, target, error);
    socket.end(rawErrorResponse(shaped.code, shaped.message));
  });
  upstream.once("close", () => connected && finish());
  socket.once("close", finish);
  return true;
}

function notAnswering(owner: string, target: PreviewTarget, error: Error): AgentVmError {
  return new AgentVmError("PREVIEW_NODE_UNAVAILABLE", `this preview belongs to cluster node ${owner}, whose preview origin ${target.origin} did not answer (${(error as NodeJS.ErrnoException).code ?? error.message}); try again once it is back`, { cause: error });
}

/**
 * SNI names the owner's advertised host, not the Host header the browser sent (which names this
 * node or a shared preview domain). SNI carries names only: "" sends none for an IP address
 * (undefined would make node:https fall back to the Host header).
 */
function tlsServerName(target: PreviewTarget): string {
  return isIP(target.host) === 0 ? target.host : "";
}
