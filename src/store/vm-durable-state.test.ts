/**
 * A VM's durable state (what a cluster node keeps in the engine): captured from
 * one store and restored into an empty one, it gives the same rows; a state
 * that is not one is refused before anything is written.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, it } from "node:test";
import { PreviewStore } from "./preview-store.ts";
import { SqliteStore } from "./sqlite-store.ts";
import { captureVmState, parseVmState, restoreVmState } from "./vm-durable-state.ts";

const dirs: string[] = [];
const open = () => {
  const dir = mkdtempSync(join(tmpdir(), "agentvm-durable-"));
  dirs.push(dir);
  const store = new SqliteStore(dir);
  return { store, previews: new PreviewStore(store) };
};
after(() => dirs.forEach((dir) => rmSync(dir, { recursive: true, force: true })));

it("a captured state restores the VM's row, lifecycle, restart-on-wake processes and active previews, and nothing expired", () => {
  const now = Date.now();
  const from = open();
  from.store.ensureVm("vm", "k", "k");
  from.store.setLifecycle("vm", "k", 3600, 60);
  from.store.addWakeProcess("vm", "k", { command: "node", args: ["server.js"], cwd: "/home/agentos", env: { PORT: "3000" } });
  from.previews.insert("a".repeat(64), { tokenPrefix: "aaaaaa", definition: "vm", key: "k", port: 3000, createdAt: now, expiresAt: now + 60_000 });
  from.previews.insert("b".repeat(64), { tokenPrefix: "bbbbbb", definition: "vm", key: "k", port: 3000, createdAt: now - 2, expiresAt: now - 1 });
  const state = captureVmState(from.store, from.previews, "vm", "k", now)!;
  assert.equal(state.previews.length, 1, "an expired preview is not kept");

  const to = open();
  restoreVmState(to.store, to.previews, "vm", "k", "k", parseVmState(JSON.stringify(state)), now);
  const record = to.store.getVm("vm", "k")!;
  assert.equal(record.createdAt, from.store.getVm("vm", "k")!.createdAt);
  assert.equal(record.maxLifetimeSeconds, 3600);
  assert.equal(record.idleTimeoutSeconds, 60);
  assert.deepEqual(to.store.wakeProcesses("vm", "k").map(({ id: _id, ...process }) => process), [{ command: "node", args: ["server.js"], cwd: "/home/agentos", env: { PORT: "3000" } }]);
  assert.equal(to.previews.find("a".repeat(64))?.port, 3000);
  assert.deepEqual(captureVmState(to.store, to.previews, "vm", "k", now), state);
});

it("a VM without a row, or being destroyed, has no state to keep", () => {
  const { store, previews } = open();
  assert.equal(captureVmState(store, previews, "vm", "none"), null);
  store.ensureVm("vm", "k", "k");
  store.markDestroying("vm", "k");
  assert.equal(captureVmState(store, previews, "vm", "k"), null);
});

it("a saved state that is not one is refused with INTERNAL and writes nothing", () => {
  const good = { v: 1, createdAt: 1, maxLifetimeSeconds: null, idleTimeoutSeconds: null, wakeProcesses: [], previews: [] };
  for (const bad of ["{", "[]", JSON.stringify({ ...good, v: 2 }), JSON.stringify({ ...good, extra: 1 }), JSON.stringify({ ...good, previews: [["x", "p", 1, 1, 1]] }), JSON.stringify({ ...good, wakeProcesses: [{ args: [] }] })]) {
    assert.throws(() => parseVmState(bad), (error: { code?: string }) => error.code === "INTERNAL", bad);
  }
  assert.deepEqual(parseVmState(JSON.stringify(good)), good);
});
