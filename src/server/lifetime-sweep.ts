/**
 * `agentOS({ lifecycle: { maxLifetimeSeconds } })` and a VM's own
 * `setLifecycle({ maxLifetimeSeconds })`: a VM is destroyed once it is that
 * old, awake or asleep. A wake checks it too (vm-actor.ts); this sweep finds
 * the VMs nobody touches. It runs every second (every tenth of a definition's
 * lifetime when that is shorter, at least every 100 ms).
 */
import { log } from "../log.ts";
import type { SqliteStore } from "../store/sqlite-store.ts";
import type { VmDefinition } from "./definition.ts";

/** VMs destroyed per definition per pass: a backlog is worked off over several passes. */
const BATCH = 100;

export function startLifetimeSweep(
  use: Record<string, VmDefinition>,
  store: SqliteStore,
  destroy: (definition: string, key: string) => Promise<unknown>,
): { stop(): void } {
  const definitions = Object.entries(use);
  const intervalMs = Math.min(1000, ...definitions.map(([, definition]) => (definition.lifecycle.maxLifetimeSeconds ?? Infinity) * 100));
  const inFlight = new Set<string>();
  const pass = () => {
    if (!store.db.isOpen) return;
    for (const [name, definition] of definitions) {
      for (const key of store.vmsPastLifetime(name, definition.lifecycle.maxLifetimeSeconds ?? null, Date.now(), BATCH)) {
        const id = `${name}\u0000${key}`;
        if (inFlight.has(id)) continue;
        inFlight.add(id);
        log("warn", `VM ${JSON.stringify(key)} reached its maxLifetimeSeconds; destroying it`, { definition: name, key });
        destroy(name, key)
          .catch((error: Error) => log("error", `destroying VM ${JSON.stringify(key)} at the end of its lifetime failed: ${error.message}`, { definition: name, key }))
          .finally(() => inFlight.delete(id));
      }
    }
  };
  const timer = setInterval(pass, Math.max(100, intervalMs));
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
