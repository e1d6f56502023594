/**
 * The node's own RivetKit actor (one per node, keyed by its name, in its pool):
 * it keeps what the node's token checks need beyond its disk — the token secret,
 * so tickets and tokens the node signed stay valid after its disk is lost, and
 * the tokens it revoked and the VMs it destroyed, so those stay void
 * (durable-state.ts). The node asks it once as it starts (`attach`), then writes
 * through its context (or its `revoke` / `cutoff` actions, through the engine,
 * when the engine restarted it); it stays awake as long as the node runs.
 */
import { AgentVmError } from "../errors.ts";
import type { RivetKit } from "./rivetkit.ts";
import { readNodeAuth, writeCutoff, writeRevocation, type ActorContext, type NodeDurability } from "./durable-state.ts";

export function nodeActorDefinition(rivet: RivetKit, durability: NodeDurability, nodeClosed: Promise<void>): unknown {
  return rivet.actor({
    options: { sleepTimeout: 1_000 },
    onWake: (c: ActorContext) => {
      durability.attachNode(c);
      void c.keepAwake(nodeClosed);
    },
    actions: {
      attach: async (c: ActorContext, proposedSecret: unknown, maxTokenTtlMs: unknown) => {
        if (typeof proposedSecret !== "string" || !/^[0-9a-f]{64,}$/.test(proposedSecret)) throw new AgentVmError("INVALID_ARGUMENT", "attach: the proposed secret must be hex, at least 256 bits");
        if (typeof maxTokenTtlMs !== "number" || !(maxTokenTtlMs > 0)) throw new AgentVmError("INVALID_ARGUMENT", "attach: maxTokenTtlMs must be a positive number");
        return readNodeAuth(c, proposedSecret, maxTokenTtlMs);
      },
      // How the node saves through the engine when it has no live context of this actor (it was restarted).
      revoke: async (c: ActorContext, id: unknown, expiresAt: unknown) => {
        if (typeof id !== "string" || id.length === 0 || id.length > 64 || typeof expiresAt !== "number") throw new AgentVmError("INVALID_ARGUMENT", "revoke takes a token id and its expiry (epoch ms)");
        await writeRevocation(c, id, expiresAt);
      },
      cutoff: async (c: ActorContext, definition: unknown, key: unknown, notBefore: unknown) => {
        if (typeof definition !== "string" || typeof key !== "string" || typeof notBefore !== "number") throw new AgentVmError("INVALID_ARGUMENT", "cutoff takes a definition, a key and a time (epoch ms)");
        await writeCutoff(c, definition, key, notBefore);
      },
    },
  });
}
