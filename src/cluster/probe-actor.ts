/**
 * The engine watchdog's probe actor (src/cluster/engine-watchdog.ts). Every
 * node defines it next to its VM definitions so the watchdog can create a real
 * actor in a live node's pool — the path a client's new key takes — without
 * waking a VM. It does nothing and is destroyed right after it is created.
 * Its name has a dash, which VM definition names (identifiers) cannot have.
 */
import type { RivetKit } from "./rivetkit.ts";

export const PROBE_ACTOR_NAME = "agentvm-engine-probe";

export function probeActorDefinition(rivet: RivetKit): unknown {
  return rivet.actor({ options: { sleepTimeout: 1_000 }, actions: {} });
}
