/**
 * The part of Rivet Engine's public HTTP API that agentvm uses: actors by name
 * and key, the connected runners (envoys), and actions through the engine's
 * gateway. Clients use it to locate VMs (cluster-locator.ts); nodes use it to
 * reach their own actors when they are not awake in the node
 * (src/cluster/durable-state.ts). Plain fetch, so it runs in Node and browsers.
 */
import { AgentVmError } from "../errors.ts";

/** The engine's API answers in milliseconds, but can stall for seconds while it handles a lost node. */
const ENGINE_CALL_TIMEOUT_MS = 5_000;
const ENGINE_CALL_ATTEMPTS = 3;

export interface EngineActor {
  actor_id: string;
  key?: string;
  runner_name_selector: string;
  destroy_ts: number | null;
}

export interface Envoy {
  pool_name: string;
  stop_ts: number | null;
  last_ping_ts: number;
}

export type EngineFetch = (url: string, init: RequestInit) => Promise<Response>;

export class EngineApi {
  readonly url: string;
  readonly #fetch: EngineFetch;

  constructor(url: string, fetchEngine: EngineFetch) {
    this.url = url;
    this.#fetch = fetchEngine;
  }

  /** The live (not destroyed) actor of this name and key, if any. */
  async findActor(name: string, key: string): Promise<EngineActor | undefined> {
    const found = await this.json<{ actors: EngineActor[] }>("GET", `/actors?namespace=default&name=${encodeURIComponent(name)}&key=${encodeURIComponent(serializeActorKey(key))}`);
    return found.actors.find((actor) => actor.destroy_ts === null);
  }

  /** Creates an actor in `pool`; it stays in that pool (crash_policy "sleep": a lost node's actors wait for it). */
  async createActor(name: string, key: string, pool: string, crashPolicy: "sleep" | "destroy" = "sleep"): Promise<EngineActor> {
    return (await this.json<{ actor: EngineActor }>("PUT", "/actors?namespace=default", { name, key: serializeActorKey(key), runner_name_selector: pool, crash_policy: crashPolicy })).actor;
  }

  async destroyActor(actorId: string): Promise<void> {
    await this.json("DELETE", `/actors/${encodeURIComponent(actorId)}?namespace=default`);
  }

  /** One page of the actors of this name (every pool), and the cursor of the next page. */
  async listActors(name: string, cursor: string | null): Promise<{ actors: EngineActor[]; cursor: string | null }> {
    const page = await this.json<{ actors: EngineActor[]; pagination: { cursor: string | null } }>(
      "GET",
      `/actors?namespace=default&name=${encodeURIComponent(name)}&limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
    );
    return { actors: page.actors, cursor: page.pagination.cursor };
  }

  async envoys(): Promise<Envoy[]> {
    return (await this.json<{ envoys: Envoy[] }>("GET", "/envoys?namespace=default")).envoys;
  }

  /**
   * Calls an actor's action through the engine's gateway (which wakes it on its
   * node). Not retried: an action need not be idempotent. Throws the fetch's own
   * error on a timeout or an unreachable engine, and INTERNAL with the engine's
   * answer otherwise; callers say what that means for them.
   */
  async action<T>(actorId: string, action: string, args: unknown[], timeoutMs: number): Promise<{ status: number; output?: T; text: string }> {
    const response = await this.#fetch(`${this.url}/gateway/${encodeURIComponent(actorId)}/action/${encodeURIComponent(action)}`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-rivet-encoding": "json" },
      body: JSON.stringify({ args }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await response.text();
    if (!response.ok) return { status: response.status, text };
    return { status: response.status, output: (JSON.parse(text) as { output?: T }).output, text };
  }

  /** The engine's own API. Every call here is idempotent (lookups, get-or-create), so a call that times out is tried again. */
  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    let response: Response | undefined;
    for (let attempt = 1; !response; attempt++) {
      try {
        response = await this.#fetch(`${this.url}${path}`, {
          method,
          headers: body === undefined ? {} : { "content-type": "application/json" },
          ...(body === undefined ? {} : { body: JSON.stringify(body) }),
          signal: AbortSignal.timeout(ENGINE_CALL_TIMEOUT_MS),
        });
      } catch (error) {
        if ((error as Error).name !== "TimeoutError" || attempt >= ENGINE_CALL_ATTEMPTS) throw engineUnreachable(this.url, error);
      }
    }
    const text = await response.text();
    if (response.status === 401 || response.status === 403) throw new AgentVmError("UNAUTHENTICATED", `the engine at ${this.url} refused the request (${response.status}): pass its token as createClient({ endpoint, token })`);
    if (!response.ok) throw new AgentVmError("INTERNAL", `${method} ${path} on the engine answered ${response.status}: ${text.slice(0, 300)}`);
    return (text ? JSON.parse(text) : {}) as T;
  }
}

export function engineUnreachable(engine: string, error: unknown): AgentVmError {
  const cause = (error as { cause?: { code?: string; message?: string } }).cause;
  return new AgentVmError("SERVER_UNREACHABLE", `cannot reach the engine at ${engine}: ${cause?.code ?? cause?.message ?? (error as Error).message}`, { cause: error });
}

/** RivetKit's key form: one part per array element, "/" separated, with "\" and "/" escaped. Our canonical key is one part. */
export function serializeActorKey(key: string): string {
  return key.replace(/\\/g, "\\\\").replace(/\//g, "\\/");
}

/** The inverse of serializeActorKey, for a one-part key. */
export function deserializeActorKey(serialized: string): string {
  return serialized.replace(/\\(.)/g, "$1");
}
