/**
 * What a node keeps in Rivet Engine so that it outlives the node's disk
 * (docs/cluster.md, "What fails how"): each VM's rows (src/store/vm-durable-state.ts)
 * with the VM's own actor, and the node's token secret, revocations and
 * cutoffs with the node's actor (node-actor.ts). Both live in the actor's KV
 * storage, which the engine keeps (RocksDB, or PostgreSQL for an HA engine);
 * a write resolves once the engine has it.
 *
 * A VM's actor is awake on this node while its VM is (vm-actor-adapter.ts), so
 * a save normally writes through the actor's context at once. A VM the node
 * woke by itself (a client holding a ticket calls the node directly) may have
 * no awake actor: then the save goes through the engine, which wakes the actor
 * here and runs its `saveState` action.
 *
 * A VM's state is one KV value when it fits (one write per save). KV values are
 * capped at 128 KiB, so a larger one (up to 1024 preview tokens) is written as
 * chunks of a new generation first, then a header naming that generation: one
 * write switches from the old state to the new, and a save cut off half-way
 * leaves the old one whole. (RivetKit's batch KV calls work on a
 * different key space from get/put, the one its SQLite uses; only get, put,
 * delete and listPrefix are used here.)
 */
import { createHash, randomBytes } from "node:crypto";
import { AgentVmError } from "../errors.ts";
import { EngineApi } from "../client/engine-api.ts";
import { canonicalKey } from "../client/client.ts";
import { log } from "../log.ts";
import { parseVmState, type DurableAuthState, type DurableCopy, type VmDurableState } from "../store/vm-durable-state.ts";

/** The part of a RivetKit actor context used here (rivetkit's types are not a dependency of the main package). */
export interface ActorContext {
  actorId: string;
  key: readonly string[];
  kv: {
    get(key: string): Promise<string | null>;
    get(key: string, options: { type: "binary" }): Promise<Uint8Array | null>;
    put(key: string, value: string | Uint8Array): Promise<void>;
    delete(key: string): Promise<void>;
    listPrefix(prefix: string): Promise<[string, string][]>;
  };
  keepAwake<T>(promise: Promise<T>): Promise<T>;
}

/** The node's own actor: one per node, in its pool, holding its token secret and revocations. Not an identifier, so no VM definition can take the name. */
export const NODE_ACTOR = "agentvm-node";

const VM_STATE = "agentvm.vm.state";
const VM_STATE_CHUNK = "agentvm.vm.chunk.";
const CHUNK_BYTES = 120_000;
const NODE_SECRET = "agentvm.node.secret";
const NODE_REVOKED = "agentvm.node.revoked.";
const NODE_CUTOFF = "agentvm.node.cutoff.";
/** A save through the engine may first wait for the actor to wake. */
const ENGINE_SAVE_TIMEOUT_MS = 15_000;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The header names the state: inline when it fits one value (one write), else its chunks' generation. */
type StateHeader = { inline: string } | { generation: string; chunks: number; bytes: number };

/** Each awake actor's header as last written or read here, so a save need not read it first. */
const headers = new Map<string, StateHeader | null>();

/** Writes a VM's state into its actor's KV (null drops it). */
export async function writeVmState(c: ActorContext, state: VmDurableState | null): Promise<void> {
  const previous = headers.has(c.actorId) ? headers.get(c.actorId)! : await readHeader(c);
  let next: StateHeader | null = null;
  if (state === null) {
    await c.kv.delete(VM_STATE);
  } else {
    const json = JSON.stringify(state);
    const bytes = encoder.encode(json);
    if (bytes.length <= CHUNK_BYTES) {
      next = { inline: json };
    } else {
      const generation = randomBytes(6).toString("base64url");
      let chunks = 0;
      for (let offset = 0; offset < bytes.length; offset += CHUNK_BYTES, chunks++) {
        await c.kv.put(`${VM_STATE_CHUNK}${generation}.${chunks}`, bytes.subarray(offset, offset + CHUNK_BYTES));
      }
      next = { generation, chunks, bytes: bytes.length };
    }
    await c.kv.put(VM_STATE, JSON.stringify(next));
  }
  headers.set(c.actorId, next);
  // An older generation's chunks are garbage now; a delete that fails leaves only unreferenced chunks.
  if (previous && "generation" in previous) {
    for (let index = 0; index < previous.chunks; index++) await c.kv.delete(`${VM_STATE_CHUNK}${previous.generation}.${index}`).catch(() => undefined);
  }
}

async function readHeader(c: ActorContext): Promise<StateHeader | null> {
  const text = await c.kv.get(VM_STATE);
  const header = text === null ? null : (JSON.parse(text) as StateHeader);
  headers.set(c.actorId, header);
  return header;
}

/** The actor went to sleep: its header is read again on its next wake. */
export function forgetVmState(c: ActorContext): void {
  headers.delete(c.actorId);
}

/** The VM state saved in its actor's KV, or null when there is none. */
export async function readVmState(c: ActorContext): Promise<VmDurableState | null> {
  const header = await readHeader(c);
  if (header === null) return null;
  if ("inline" in header) return parseVmState(header.inline);
  const whole = new Uint8Array(header.bytes);
  let offset = 0;
  for (let index = 0; index < header.chunks; index++) {
    const part = await c.kv.get(`${VM_STATE_CHUNK}${header.generation}.${index}`, { type: "binary" });
    if (!part) throw new AgentVmError("INTERNAL", "the VM state saved in the engine is missing a chunk; it was not restored");
    whole.set(part, offset);
    offset += part.length;
  }
  return parseVmState(decoder.decode(whole));
}

export function writeRevocation(c: ActorContext, id: string, expiresAt: number): Promise<void> {
  return c.kv.put(`${NODE_REVOKED}${id}`, String(expiresAt));
}

export function writeCutoff(c: ActorContext, definition: string, key: string, notBefore: number): Promise<void> {
  return c.kv.put(`${NODE_CUTOFF}${createHash("sha256").update(vmId(definition, key)).digest("base64url")}`, JSON.stringify([definition, key, notBefore]));
}

/** The node actor's part: its secret (the first node to ask sets it), revocations and cutoffs, with expired ones dropped. */
export async function readNodeAuth(c: ActorContext, proposedSecret: string, maxTokenTtlMs: number, now = Date.now()): Promise<{ secret: string; revoked: [string, number][]; cutoffs: [string, string, number][] }> {
  let secret = await c.kv.get(NODE_SECRET);
  if (secret === null) {
    await c.kv.put(NODE_SECRET, proposedSecret);
    secret = proposedSecret;
  }
  const stale: string[] = [];
  const revoked: [string, number][] = [];
  for (const [name, value] of await c.kv.listPrefix(NODE_REVOKED)) {
    const expiresAt = Number(value);
    if (expiresAt > now) revoked.push([name.slice(NODE_REVOKED.length), expiresAt]);
    else stale.push(name);
  }
  const cutoffs: [string, string, number][] = [];
  for (const [name, value] of await c.kv.listPrefix(NODE_CUTOFF)) {
    const [definition, key, notBefore] = JSON.parse(value) as [string, string, number];
    if (notBefore > now - maxTokenTtlMs) cutoffs.push([definition, key, notBefore]);
    else stale.push(name);
  }
  for (const name of stale) await c.kv.delete(name);
  return { secret, revoked, cutoffs };
}

/** The node's copy of what must outlive its disk (see the file header). */
export class NodeDurability implements DurableCopy {
  readonly #engine: EngineApi;
  readonly #vms = new Map<string, ActorContext>();
  #node: ActorContext | undefined;
  #nodeActorId: string | undefined;
  readonly #actorIds = new Map<string, string>();

  constructor(engine: EngineApi) {
    this.#engine = engine;
  }

  /** The VM's actor woke here: saves go through its context until it sleeps. */
  attachVm(definition: string, c: ActorContext): void {
    this.#vms.set(vmId(definition, canonicalKey([...c.key])), c);
  }

  detachVm(definition: string, c: ActorContext): void {
    const id = vmId(definition, canonicalKey([...c.key]));
    if (this.#vms.get(id) === c) this.#vms.delete(id);
    forgetVmState(c);
  }

  attachNode(c: ActorContext): void {
    this.#node = c;
  }

  async saveVm(definition: string, key: string, state: VmDurableState | null): Promise<void> {
    const c = this.#vms.get(vmId(definition, key));
    if (c) {
      try {
        return await writeVmState(c, state);
      } catch (error) {
        // The actor went to sleep between its VM's sleep and this save: the engine wakes it again.
        log("debug", `saving through the awake actor failed (${(error as Error).message}); saving through the engine`, { definition, key });
        this.detachVm(definition, c);
      }
    }
    await this.#saveThroughEngine(definition, key, state);
  }

  saveRevocation(id: string, expiresAt: number): Promise<void> {
    return this.#saveNode("revoke", [id, expiresAt], (c) => writeRevocation(c, id, expiresAt));
  }

  saveCutoff(definition: string, key: string, notBefore: number): Promise<void> {
    return this.#saveNode("cutoff", [definition, key, notBefore], (c) => writeCutoff(c, definition, key, notBefore));
  }

  /** The node's actor, once `attach` found it: saves go through the engine when its context is gone (it was restarted). */
  set nodeActorId(id: string) {
    this.#nodeActorId = id;
  }

  async #saveNode(action: string, args: unknown[], write: (c: ActorContext) => Promise<void>): Promise<void> {
    const c = this.#node;
    if (c) {
      try {
        return await write(c);
      } catch (error) {
        log("debug", `saving through the node's actor failed (${(error as Error).message}); saving through the engine`);
        if (this.#node === c) this.#node = undefined;
      }
    }
    const unavailable = (why: string, cause?: unknown) =>
      new AgentVmError("CLUSTER_UNAVAILABLE", `the change is in effect on this node but could not be kept in the engine at ${this.#engine.url} (${why}), so a loss of this node's disk would undo it; retry`, cause === undefined ? {} : { cause });
    if (!this.#nodeActorId) throw unavailable("the node has not attached to its actor yet");
    let answer: { status: number; text: string };
    try {
      answer = await this.#engine.action(this.#nodeActorId, action, args, ENGINE_SAVE_TIMEOUT_MS);
    } catch (error) {
      throw unavailable((error as Error).message, error);
    }
    if (answer.status >= 400) throw unavailable(`${answer.status}: ${answer.text.slice(0, 200)}`);
  }

  async #saveThroughEngine(definition: string, key: string, state: VmDurableState | null): Promise<void> {
    const id = vmId(definition, key);
    let actorId = this.#actorIds.get(id);
    if (!actorId) {
      const actor = await this.#engine.findActor(definition, key);
      // A VM made on a single server's data directory before it joined a cluster has no actor: nothing to keep it with.
      if (!actor) return;
      actorId = actor.actor_id;
      this.#actorIds.set(id, actorId);
    }
    let answer: { status: number; text: string };
    try {
      answer = await this.#engine.action(actorId, "saveState", [state === null ? null : JSON.stringify(state)], ENGINE_SAVE_TIMEOUT_MS);
    } catch (error) {
      throw new AgentVmError("CLUSTER_UNAVAILABLE", `the VM's state could not be saved in the engine at ${this.#engine.url} (${(error as Error).message}); the change is in effect on this node and is saved with the next call`, { cause: error });
    }
    if (answer.status >= 400) {
      this.#actorIds.delete(id);
      throw new AgentVmError("CLUSTER_UNAVAILABLE", `the engine refused to save the VM's state (${answer.status}: ${answer.text.slice(0, 200)}); the change is in effect on this node and is saved with the next call`);
    }
  }
}

/** The auth state a node starts its server with, from what its actor answered. */
export function durableAuth(answer: { secret: string; revoked: [string, number][]; cutoffs: [string, string, number][] }): DurableAuthState {
  const secret = Buffer.from(answer.secret, "hex");
  if (secret.length < 32) throw new AgentVmError("INTERNAL", "the token secret kept in the engine is not a 256-bit hex secret");
  return { secret, revoked: answer.revoked, cutoffs: answer.cutoffs };
}

function vmId(definition: string, key: string): string {
  return `${definition}\u0000${key}`;
}
