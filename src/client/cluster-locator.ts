/**
 * Finding a VM in a cluster (docs/cluster.md). The client's endpoint is then a
 * Rivet Engine, which knows where each VM actor lives. Locating a VM:
 *
 * 1. look the actor up by definition and key; a new key is created in the pool
 *    of a live agentvm node, picked by rendezvous hashing over the live nodes,
 *    and stays in that pool (the node that holds its files) from then on;
 * 2. if that node's runner is not connected to the engine, fail at once with
 *    VM_NODE_UNAVAILABLE naming the node (the engine would wait for it);
 * 3. call the actor's `locate` action through the engine's gateway: it wakes the
 *    VM on its node and answers the node's URL and a short-lived ticket.
 *
 * Everything after that (actions, vmFetch, events, previews) goes to the node
 * directly: the engine's gateway buffers streamed bodies, caps them at ~20 MiB
 * and adds tens of milliseconds per call (DESIGN §6).
 *
 * This speaks the engine's public HTTP API with fetch, so the client needs no
 * RivetKit package, in Node or in a browser.
 */
import { AgentVmError } from "../errors.ts";
import { EngineApi, engineUnreachable, type EngineFetch, type Envoy } from "./engine-api.ts";

/** Pool names of agentvm nodes (src/cluster/config.ts NODE_POOL_PREFIX). */
const NODE_POOL_PREFIX = "agentvm.";
/** A runner whose last ping is older than this is taken for gone (the engine's envoy_lost_threshold is 5 s). */
const STALE_PING_MS = 8_000;
/** How long a locate through the engine may take (a node that just came back may first wait for its reschedule). */
const LOCATE_TIMEOUT_MS = 10_000;
/** Locate again this long before a ticket expires. */
const TICKET_MARGIN_MS = 30_000;

/** What a node's `locate` action answers (src/cluster/vm-actor-adapter.ts). */
export interface Location {
  node: string;
  /** The node's API, where the client sends actions and streams for this VM. */
  url: string;
  /** The node's preview origin. */
  previewUrl: string;
  /** A token for this VM only, signed by the node; null when the node's API is open (loopback, no API key). */
  ticket: string | null;
  /** Epoch ms: locate again before then. */
  expiresAt: number;
}

export class ClusterLocator {
  readonly #engine: string;
  readonly #api: EngineApi;
  readonly #cache = new Map<string, Promise<Location>>();

  constructor(engine: string, fetchEngine: EngineFetch) {
    this.#engine = engine;
    this.#api = new EngineApi(engine, fetchEngine);
  }

  /** Where the VM lives now (cached until it fails or its ticket nears expiry). */
  locate(definition: string, key: string): Promise<Location> {
    const id = `${definition}\u0000${key}`;
    let located = this.#cache.get(id);
    if (!located) {
      located = this.#locate(definition, key);
      this.#cache.set(id, located);
      located.then(
        (location) => setTimeout(() => this.#cache.get(id) === located && this.#cache.delete(id), Math.max(0, location.expiresAt - Date.now() - TICKET_MARGIN_MS)).unref?.(),
        () => this.#cache.get(id) === located && this.#cache.delete(id),
      );
    }
    return located;
  }

  /** Forgets where the VM was (after VM_MOVED, an expired ticket or an unreachable node). */
  forget(definition: string, key: string): void {
    this.#cache.delete(`${definition}\u0000${key}`);
  }

  async #locate(definition: string, key: string): Promise<Location> {
    let actor = await this.#api.findActor(definition, key);
    let envoys: Envoy[] | undefined;
    if (!actor) {
      envoys = await this.#api.envoys();
      const pools = livePools(envoys);
      if (pools.length === 0) throw new AgentVmError("VM_NODE_UNAVAILABLE", `no agentvm node is connected to the engine at ${this.#engine}; start one with \`agentvm node --engine ${this.#engine} --name <node>\``);
      actor = await this.#api.createActor(definition, key, pickPool(key, pools));
    }
    const node = nodeName(actor.runner_name_selector);
    envoys ??= await this.#api.envoys();
    if (!livePools(envoys).includes(actor.runner_name_selector)) throw nodeUnavailable(node, key, "its runner is not connected to the engine");
    let answer: { status: number; output?: Location; text: string };
    try {
      answer = await this.#api.action<Location>(actor.actor_id, "locate", [], LOCATE_TIMEOUT_MS);
    } catch (error) {
      if ((error as Error).name === "TimeoutError") throw nodeUnavailable(node, key, `it did not answer through the engine within ${LOCATE_TIMEOUT_MS / 1000} s`);
      throw engineUnreachable(this.#engine, error);
    }
    if (answer.status >= 400) {
      const detail = answer.text.slice(0, 300);
      throw answer.status >= 500 ? nodeUnavailable(node, key, `the engine answered ${answer.status}: ${detail}`) : new AgentVmError("INTERNAL", `locating VM ${JSON.stringify(key)} on node ${node}: the engine answered ${answer.status}: ${detail}`);
    }
    const output = answer.output;
    if (!output || typeof output.url !== "string") throw new AgentVmError("INTERNAL", `locating VM ${JSON.stringify(key)}: the engine's answer has no location: ${answer.text.slice(0, 200)}`);
    return output;
  }
}

function nodeName(pool: string): string {
  return pool.startsWith(NODE_POOL_PREFIX) ? pool.slice(NODE_POOL_PREFIX.length) : pool;
}

export function nodeUnavailable(node: string, key: string, why: string): AgentVmError {
  return new AgentVmError("VM_NODE_UNAVAILABLE", `VM ${JSON.stringify(key)} lives on node ${node}, which is unavailable (${why}); its files are on that node, so the VM answers again once node ${node} is back`, { details: { node } });
}

/** The agentvm pools with a runner that pinged lately, sorted. */
export function livePools(envoys: readonly Envoy[]): string[] {
  const now = Date.now();
  return [...new Set(envoys.filter((envoy) => envoy.pool_name.startsWith(NODE_POOL_PREFIX) && envoy.stop_ts === null && now - envoy.last_ping_ts < STALE_PING_MS).map((envoy) => envoy.pool_name))].sort();
}

/** Rendezvous hashing: each key goes to the live pool with the highest hash of (key, pool), so keys spread evenly and adding a node moves few. */
function pickPool(key: string, pools: readonly string[]): string {
  let best = pools[0]!;
  let bestScore = -1;
  for (const pool of pools) {
    const score = fnv1a(`${pool}\u0000${key}`);
    if (score > bestScore) {
      best = pool;
      bestScore = score;
    }
  }
  return best;
}

function fnv1a(text: string): number {
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(text)) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  // Finish with a multiply-xorshift so pools that differ only in their last characters still spread.
  hash ^= hash >>> 16;
  hash = Math.imul(hash, 0x85ebca6b) >>> 0;
  hash ^= hash >>> 13;
  return hash >>> 0;
}
