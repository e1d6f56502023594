/**
 * The VM definition served as a RivetKit actor. The engine owns which node an
 * actor runs on, when it wakes and sleeps, and what happens when a node dies;
 * the actor itself is a thin shell over the node's own VmActor (the one the
 * HTTP API drives), so both paths act on the same VM:
 *
 * - wake starts the VM from the node's data directory, and holds the RivetKit
 *   actor awake until the VM sleeps (VmActor decides: not while processes run,
 *   requests or streams are open, or a client is connected);
 * - sleep (or the node shutting down) stops the VM; files and rows stay;
 * - every action in src/actions.ts calls the same Vm method;
 * - `locate` answers where to send streams: this node's URL and a short-lived
 *   ticket (a scoped token signed by this node) for the VM.
 */
import { VM_ACTIONS } from "../actions.ts";
import { canonicalKey } from "../client/client.ts";
import { AgentVmError } from "../errors.ts";
import type { ServerInternals } from "../server/registry.ts";
import type { VmActor } from "../server/vm-actor.ts";
import type { RivetKit } from "./rivetkit.ts";
import type { Location } from "../client/cluster-locator.ts";

export type { Location };

/** How long a locate ticket lasts; the client locates again when it expires. */
export const TICKET_TTL_SECONDS = 300;


interface ActorContext {
  key: readonly string[];
  keepAwake<T>(promise: Promise<T>): Promise<T>;
}

export function vmActorDefinition(
  rivet: RivetKit,
  definitionName: string,
  internals: () => ServerInternals,
  locate: (definition: string, key: string) => Location,
): unknown {
  const vmActor = (c: ActorContext): VmActor => {
    const actor = internals().actor(definitionName, canonicalKey([...c.key]));
    if (!actor) throw new AgentVmError("UNKNOWN_ACTION", `this node defines no VM ${JSON.stringify(definitionName)}`);
    return actor;
  };
  const actions: Record<string, (c: ActorContext, ...args: unknown[]) => unknown> = {};
  for (const name of VM_ACTIONS) {
    actions[name] = (c, ...args) => vmActor(c).use((vm) => (vm[name] as (...a: unknown[]) => unknown).apply(vm, args));
  }
  actions.locate = async (c) => {
    const actor = vmActor(c);
    // The VM's row is written before this returns: from now on this node holds the VM.
    await actor.wake();
    c.keepAwake(actor.whenAsleep());
    return locate(definitionName, actor.key);
  };
  return rivet.actor({
    // The VM's own idle rule decides; this only lets the actor go once the VM slept.
    options: { sleepTimeout: 1_000 },
    onWake: async (c: ActorContext) => {
      const actor = vmActor(c);
      await actor.wake();
      c.keepAwake(actor.whenAsleep());
    },
    onSleep: async (c: ActorContext) => {
      await vmActor(c).sleep();
    },
    actions,
  });
}
