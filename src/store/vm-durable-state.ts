/**
 * What of a VM must outlive the disk it lives on: its rows, not its files.
 * A cluster node (src/cluster/durable-state.ts) keeps a copy of this with the
 * VM's actor in Rivet Engine, so a node whose disk is lost brings its VMs back
 * with their lifecycle, their restart-on-wake processes and their preview URLs
 * (docs/cluster.md, "What fails how"). Files are not in it: they are the VM's
 * disk, and come back empty.
 *
 * The copy is the whole state, captured from SQLite, so saving it is idempotent
 * and a copy is never half of two versions.
 */
import type { PreviewStore } from "./preview-store.ts";
import type { SqliteStore, WakeProcess } from "./sqlite-store.ts";
import { expectKnownKeys, expectObject } from "../validate.ts";
import { AgentVmError } from "../errors.ts";

export interface VmDurableState {
  v: 1;
  createdAt: number;
  maxLifetimeSeconds: number | null;
  idleTimeoutSeconds: number | null;
  /** spawn(…, { restartOnWake: true }) processes, oldest first. */
  wakeProcesses: Omit<WakeProcess, "id">[];
  /** Active preview tokens: [sha256 hex, prefix, port, createdAt, expiresAt]. Tokens themselves are never stored. */
  previews: [hash: string, prefix: string, port: number, createdAt: number, expiresAt: number][];
}

/**
 * Where a server keeps a copy of what must outlive its disk (a cluster node:
 * Rivet Engine, src/cluster/durable-state.ts). Each call resolves once the copy
 * is durable.
 */
export interface DurableCopy {
  /** The VM's state now; null when it was destroyed (the copy is dropped). */
  saveVm(definition: string, key: string, state: VmDurableState | null): Promise<void>;
  /** A scoped token revoked one by one (auth.ts). */
  saveRevocation(id: string, expiresAt: number): Promise<void>;
  /** Tokens for this VM issued before `notBefore` are void (it was destroyed). */
  saveCutoff(definition: string, key: string, notBefore: number): Promise<void>;
}

/** What of a server's token checks must outlive its disk: its secret, and what it revoked. */
export interface DurableAuthState {
  secret: Buffer;
  /** [token id, expiresAt]. */
  revoked: [string, number][];
  /** [definition, key, notBefore]. */
  cutoffs: [string, string, number][];
}

/** The VM's durable state now, or null when it has no row (never created, or destroyed). */
export function captureVmState(store: SqliteStore, previews: PreviewStore, definition: string, key: string, now = Date.now()): VmDurableState | null {
  const record = store.getVm(definition, key);
  if (!record || record.destroying) return null;
  return {
    v: 1,
    createdAt: record.createdAt,
    maxLifetimeSeconds: record.maxLifetimeSeconds,
    idleTimeoutSeconds: record.idleTimeoutSeconds,
    wakeProcesses: store.wakeProcesses(definition, key).map(({ id: _id, ...process }) => process),
    previews: previews.listActiveHashes(definition, key, now).map((row) => [row.hash, row.tokenPrefix, row.port, row.createdAt, row.expiresAt]),
  };
}

/**
 * Writes a saved state back as the VM's rows, in one transaction, for a VM this
 * server has no row for (its disk was lost). `directory` is the VM directory
 * name the row gets.
 */
export function restoreVmState(store: SqliteStore, previews: PreviewStore, definition: string, key: string, directory: string, state: VmDurableState, now = Date.now()): void {
  store.db.exec("BEGIN");
  try {
    store.restoreVm(definition, key, directory, state.createdAt, state.maxLifetimeSeconds, state.idleTimeoutSeconds);
    for (const process of state.wakeProcesses) store.addWakeProcess(definition, key, process);
    for (const [hash, tokenPrefix, port, createdAt, expiresAt] of state.previews) {
      if (expiresAt > now) previews.insert(hash, { tokenPrefix, definition, key, port, createdAt, expiresAt });
    }
    store.db.exec("COMMIT");
  } catch (error) {
    store.db.exec("ROLLBACK");
    throw error;
  }
}

/** Reads a saved state back, refusing anything that is not one (it crosses the engine). */
export function parseVmState(text: string): VmDurableState {
  const bad = (why: string) => new AgentVmError("INTERNAL", `the VM state saved in the engine is not valid (${why}); it was not restored`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw bad((error as Error).message);
  }
  let state: Record<string, unknown>;
  try {
    state = expectObject("saved VM state", value);
    expectKnownKeys("saved VM state", state, ["v", "createdAt", "maxLifetimeSeconds", "idleTimeoutSeconds", "wakeProcesses", "previews"]);
  } catch (error) {
    throw bad((error as Error).message);
  }
  const nullableNumber = (field: unknown) => field === null || (typeof field === "number" && Number.isFinite(field));
  if (state.v !== 1) throw bad(`version ${String(state.v)}`);
  if (typeof state.createdAt !== "number" || !nullableNumber(state.maxLifetimeSeconds) || !nullableNumber(state.idleTimeoutSeconds)) throw bad("times");
  if (!Array.isArray(state.wakeProcesses) || !state.wakeProcesses.every((process) => typeof process?.command === "string" && Array.isArray(process.args))) throw bad("wakeProcesses");
  const preview = (row: unknown) =>
    Array.isArray(row) && row.length === 5 && typeof row[0] === "string" && /^[0-9a-f]{64}$/.test(row[0]) && typeof row[1] === "string" && row.slice(2).every((n) => Number.isSafeInteger(n));
  if (!Array.isArray(state.previews) || !state.previews.every(preview)) throw bad("previews");
  return state as unknown as VmDurableState;
}
