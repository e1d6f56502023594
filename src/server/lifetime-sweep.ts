/**
 * `agentOS({ lifecycle: { maxLifetimeSeconds } })`: a VM is destroyed once it is
 * that old, awake or asleep. A wake checks it too (vm-actor.ts); this sweep finds
 * the VMs nobody touches. It runs every tenth of the shortest lifetime (between
 * 100 ms and a minute), so a VM outlives its lifetime by at most that much.
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
  const bounded = Object.entries(use).filter(([, definition]) => definition.lifecycle.maxLifetimeSeconds !== undefined);
  if (bounded.length === 0) return { stop() {} };
  const shortest = Math.min(...bounded.map(([, definition]) => definition.lifecycle.maxLifetimeSeconds! * 1000));
  const inFlight = new Set<string>();
  const pass = () => {
    if (!store.db.isOpen) return;
    for (const [name, definition] of bounded) {
      const bornBefore = Date.now() - definition.lifecycle.maxLifetimeSeconds! * 1000;
      for (const key of store.vmsCreatedBefore(name, bornBefore, BATCH)) {
        const id = `${name}\u0000${key}`;
        if (inFlight.has(id)) continue;
        inFlight.add(id);
        log("warn", `VM ${JSON.stringify(key)} reached lifecycle.maxLifetimeSeconds; destroying it`, { definition: name, key });
        destroy(name, key)
          .catch((error: Error) => log("error", `destroying VM ${JSON.stringify(key)} at the end of its lifetime failed: ${error.message}`, { definition: name, key }))
          .finally(() => inFlight.delete(id));
      }
    }
  };
  const timer = setInterval(pass, Math.min(60_000, Math.max(100, shortest / 10)));
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
