/**
 * The engine watchdog (`agentvm engine --watchdog`). Rivet Engine 2.3.19 can
 * stop creating actors after a runner was dropped and came back: PUT /actors
 * hangs for every pool while existing actors keep answering, and only a restart
 * clears it (docs/cluster.md, "Known engine issue"). So every interval the
 * watchdog creates a throwaway actor the way a client's new key is created —
 * in the pool of a live agentvm node, with a key — and destroys it again. A
 * probe that hangs past its timeout twice in a row makes it restart the engine
 * (on the same data directory: placement survives, runners reconnect).
 *
 * The probe targets a live node's pool, with the node's own probe actor
 * (src/cluster/probe-actor.ts): a creation in a pool without a runner did not
 * show the stall reliably. Without a live node there is nothing to probe, and
 * nothing a client could be creating either.
 */
import { setTimeout as sleep } from "node:timers/promises";
import { EngineApi } from "../client/engine-api.ts";
import { livePools } from "../client/cluster-locator.ts";
import { PROBE_ACTOR_NAME } from "./probe-actor.ts";

export type ProbeResult =
  | { outcome: "created"; pool: string; ms: number }
  | { outcome: "no-node" }
  | { outcome: "hung"; step: string }
  | { outcome: "failed"; message: string };

/** One probe: find a live agentvm pool, create a probe actor in it within `timeoutMs`, then destroy it. */
export async function probeActorCreation(engineUrl: string, token: string | undefined, timeoutMs: number): Promise<ProbeResult> {
  const deadline = AbortSignal.timeout(timeoutMs);
  const authorization: Record<string, string> = token ? { authorization: `Bearer ${token}` } : {};
  // Every call of this probe shares one deadline (on top of the API's own per-call timeout).
  const engine = new EngineApi(engineUrl, (url, init) =>
    fetch(url, { ...init, headers: { ...(init.headers as Record<string, string>), ...authorization }, signal: init.signal ? AbortSignal.any([init.signal, deadline]) : deadline }),
  );
  const started = Date.now();
  let step = "GET /envoys";
  try {
    const pools = livePools(await engine.envoys());
    if (pools.length === 0) return { outcome: "no-node" };
    // Any live node will do; a random one spreads probes over all of them.
    const pool = pools[Math.floor(Math.random() * pools.length)]!;
    step = `PUT /actors in pool ${pool}`;
    const key = `probe-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    const created = await engine.createActor(PROBE_ACTOR_NAME, key, pool, "destroy");
    const ms = Date.now() - started;
    // Creation is what stalls; the destroy only tidies up, with its own bound.
    await engine.destroyActor(created.actor_id).catch(() => undefined);
    return { outcome: "created", pool, ms };
  } catch (error) {
    if (deadline.aborted) return { outcome: "hung", step };
    return { outcome: "failed", message: `${step}: ${(error as Error).message}` };
  }
}

export interface WatchdogSettings {
  /** The engine to probe, read before every probe (a restart replaces it). */
  engineUrl: () => string;
  token: string | undefined;
  intervalMs: number;
  timeoutMs: number;
  log: (line: string) => void;
  /** Restarts the engine; the watchdog waits for it before probing again. */
  restart: (why: string) => Promise<void>;
}

export interface Watchdog {
  stop(): void;
}

/** Probes every `intervalMs` (from the end of one probe to the next); two hung probes in a row restart the engine. */
export function startWatchdog(settings: WatchdogSettings): Watchdog {
  const stopped = new AbortController();
  const seconds = (ms: number) => `${ms / 1000} s`;
  void (async () => {
    let hung = 0;
    let last: ProbeResult["outcome"] | undefined;
    let lastFailure = "";
    while (!stopped.signal.aborted) {
      try {
        await sleep(settings.intervalMs, undefined, { signal: stopped.signal });
      } catch {
        return;
      }
      const result = await probeActorCreation(settings.engineUrl(), settings.token, settings.timeoutMs);
      if (stopped.signal.aborted) return;
      if (result.outcome === "hung") {
        hung++;
        settings.log(`agentvm engine: watchdog: the engine did not answer ${result.step} within ${seconds(settings.timeoutMs)} (${hung} in a row)`);
        if (hung >= 2) {
          hung = 0;
          last = undefined;
          const what = result.step.startsWith("PUT /actors") ? "the engine stopped creating actors" : "the engine stopped answering";
          await settings.restart(`${what}: ${result.step} hung past ${seconds(settings.timeoutMs)} twice in a row (docs/cluster.md, "Known engine issue")`);
        }
        continue;
      }
      hung = 0;
      // Only changes are logged: the first working probe, a node-less engine, a failure, a recovery.
      if (result.outcome === "created" && last !== "created") settings.log(`agentvm engine: watchdog: probe actor created in pool ${result.pool} in ${result.ms} ms; probing every ${seconds(settings.intervalMs)}`);
      if (result.outcome === "no-node" && last !== "no-node") settings.log("agentvm engine: watchdog: no agentvm node is connected; nothing to probe until one is");
      if (result.outcome === "failed" && (last !== "failed" || result.message !== lastFailure)) settings.log(`agentvm engine: watchdog: probe failed (not counted as a hang): ${result.message}`);
      last = result.outcome;
      lastFailure = result.outcome === "failed" ? result.message : "";
    }
  })();
  return { stop: () => stopped.abort() };
}
