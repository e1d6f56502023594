/**
 * The VM definition served as a RivetKit actor. The engine owns which node an
 * actor runs on, when it wakes and sleeps, and what happens when a node dies;
 * the actor itself is a thin shell over the node's own VmActor (the one the
 * HTTP API drives), so both paths act on the same VM:
 *
 * - the VM starts from the node's data directory on its first use (locate, an
 *   action, a stream or a preview), and the RivetKit actor is held awake until
 *   the VM sleeps (VmActor decides: not while processes run, requests or streams
 *   are open, or a client is connected). A VM the node has no row for, whose
 *   actor kept a saved state, lost its disk: the actor's wake restores its rows
 *   from that state (durable-state.ts); its files start empty;
 * - sleep (or the node shutting down) stops the VM; files and rows stay;
 * - every action in src/actions.ts calls the same Vm method;
 * - `locate` answers where to send streams: this node's URL and a short-lived
 *   ticket (a scoped token signed by this node) for the VM;
 * - `saveState` is how the node saves the VM's state when the actor was asleep.
 */
import { VM_ACTIONS } from "../actions.ts";
import { canonicalKey } from "../client/client.ts";
import { AgentVmError } from "../errors.ts";
import type { ServerInternals } from "../server/registry.ts";
import type { VmActor } from "../server/vm-actor.ts";
import type { RivetKit } from "./rivetkit.ts";
import type { Location } from "../client/cluster-locator.ts";
import { parseVmState } from "../store/vm-durable-state.ts";
import { readVmState, writeVmState, type ActorContext, type NodeDurability } from "./durable-state.ts";

export type { Location };

/** How long a locate ticket lasts; the client locates again when it expires. */
export const TICKET_TTL_SECONDS = 300;


export function vmActorDefinition(
  rivet: RivetKit,
  definitionName: string,
  internals: () => Promise<ServerInternals>,
  durability: NodeDurability,
  locate: (definition: string, key: string) => Location,
): unknown {
  const vmActor = async (c: ActorContext): Promise<VmActor> => {
    const actor = (await internals()).actor(definitionName, canonicalKey([...c.key]));
    if (!actor) throw new AgentVmError("UNKNOWN_ACTION", `this node defines no VM ${JSON.stringify(definitionName)}`);
    return actor;
  };
  /** Holds the RivetKit actor awake as long as its VM is. */
  const stayAwhile = (c: ActorContext, actor: VmActor) => void c.keepAwake(actor.whenAsleep());
  const actions: Record<string, (c: ActorContext, ...args: unknown[]) => unknown> = {};
  for (const name of VM_ACTIONS) {
    actions[name] = async (c, ...args) => {
      const actor = await vmActor(c);
      try {
        return await actor.use((vm) => (vm[name] as (...a: unknown[]) => unknown).apply(vm, args));
      } finally {
        stayAwhile(c, actor);
      }
    };
  }
  actions.locate = async (c) => {
    const actor = await vmActor(c);
    // The VM's row is written before this returns: from now on this node holds the VM.
    await actor.wake();
    stayAwhile(c, actor);
    return locate(definitionName, actor.key);
  };
  // Called by a node starting without the VM's rows (its disk was lost): waking the actor restores them.
  actions.restore = async (c) => (await internals()).holds(definitionName, canonicalKey([...c.key]));
  actions.saveState = async (c, json) => {
    if (json !== null && typeof json !== "string") throw new AgentVmError("INVALID_ARGUMENT", "saveState takes the state as JSON text, or null");
    await writeVmState(c, json === null ? null : parseVmState(json));
  };
  return rivet.actor({
    // The VM's own idle rule decides; this only lets the actor go once the VM slept.
    options: { sleepTimeout: 1_000 },
    onWake: async (c: ActorContext) => {
      const server = await internals();
      durability.attachVm(definitionName, c);
      const key = canonicalKey([...c.key]);
      if (!server.holds(definitionName, key)) {
        const saved = await readVmState(c);
        if (saved) server.restoreVm(definitionName, key, saved);
      }
      // The VM itself starts on its first use (locate, an action, a stream, a preview), not here:
      // this actor also wakes only to save or drop the VM's state, e.g. right after a destroy.
      stayAwhile(c, await vmActor(c));
    },
    onSleep: async (c: ActorContext) => {
      durability.detachVm(definitionName, c);
      const actor = await vmActor(c);
      // A request that reached the node directly (with a ticket) may have woken the VM again in
      // the second before this sleep: it keeps the VM, whose own idle rule ends it later.
      if (!actor.inUse) await actor.sleep();
    },
    actions,
  });
}
