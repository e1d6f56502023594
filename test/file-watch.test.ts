/**
 * Watches through a real server: inotify inside the VM, guest paths in the
 * events, coalescing and overflow, a typed error for a missing path, and the
 * watch's life tied to the VM's (it keeps the VM awake; it ends when the VM is
 * destroyed or the watched directory goes).
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type Registry, type RunningServer, type VmDefinition } from "agentvm";
import { createClient, type AgentVmClient, type VmHandle, type WatchEvent } from "agentvm/client";
import { rejection, tempDataDir, waitFor } from "./helpers.ts";

const SLEEP_AFTER_MS = 300;

describe("watches", () => {
  let server: RunningServer;
  let client: AgentVmClient<Registry<{ vm: VmDefinition }>>;
  let vm: VmHandle;

  before(async () => {
    const dataDir = await tempDataDir("agentvm-watch-");
    const registry = setup({ use: { vm: agentOS({ sleepAfterMs: SLEEP_AFTER_MS }) } });
    server = await registry.start({ port: 0, dataDir, handleSignals: false });
    client = createClient<typeof registry>(server.url);
    vm = client.vm.getOrCreate("watched");
  });
  after(() => server.close());

  async function awake(key: string): Promise<boolean> {
    const response = await fetch(`${server.url}/api/vm/${key}/status`);
    return ((await response.json()) as { value: { awake: boolean } }).value.awake;
  }

  it("reports create, modify, rename and delete done by a guest process, in order", async () => {
    await vm.mkdir("/home/agentos/work", { recursive: true });
    const events: WatchEvent[] = [];
    const watch = await vm.watch("/home/agentos/work", { onEvent: (event) => events.push(event) });
    // Pauses well above the 50 ms coalescing window, so each step is its own event.
    const steps = "echo one > a.txt; sleep 0.4; echo two >> a.txt; sleep 0.4; mv a.txt b.txt; sleep 0.4; rm b.txt";
    assert.equal((await vm.exec("sh", ["-c", steps], { cwd: "/home/agentos/work" })).exitCode, 0);
    await waitFor(() => events.some((event) => event.type === "delete"), `the delete event (events so far: ${JSON.stringify(events)})`);
    assert.deepEqual(events, [
      { type: "create", path: "/home/agentos/work/a.txt" },
      { type: "modify", path: "/home/agentos/work/a.txt" },
      { type: "rename", path: "/home/agentos/work/b.txt", oldPath: "/home/agentos/work/a.txt" },
      { type: "delete", path: "/home/agentos/work/b.txt" },
    ]);
    await watch.close();
    await watch.closed;
  });

  it("recursive watches see nested paths; events can be iterated", async () => {
    await vm.mkdir("/home/agentos/tree/deep", { recursive: true });
    const watch = await vm.watch("/home/agentos/tree", { recursive: true });
    await vm.exec("sh", ["-c", "echo x > /home/agentos/tree/deep/file.txt"]);
    for await (const event of watch) {
      if (event.path === "/home/agentos/tree/deep/file.txt") {
        assert.equal(event.type, "create");
        break; // leaving the loop closes the watch
      }
    }
    await watch.closed;
  });

  it("many changes at once: every path is reported, or an overflow event says some were not", async () => {
    await vm.mkdir("/home/agentos/burst", { recursive: true });
    const seen = new Set<string>();
    let overflow = false;
    const watch = await vm.watch("/home/agentos/burst", {
      onEvent: (event) => {
        if (event.type === "overflow") overflow = true;
        else if (event.type === "create") seen.add(event.path);
      },
    });
    const script = "const fs = require('fs'); for (let i = 0; i < 3000; i++) fs.writeFileSync('/home/agentos/burst/f' + i, '');";
    assert.equal((await vm.exec("node", ["-e", script])).exitCode, 0);
    await waitFor(() => overflow || seen.size === 3000, `all 3000 creates or an overflow event (got ${seen.size} creates)`);
    await watch.close();
  });

  it("a watch on a missing path is ENOENT; bad options are INVALID_ARGUMENT", async () => {
    const missing = await rejection(vm.watch("/home/agentos/does-not-exist"));
    assert.equal(missing.code, "ENOENT");
    const response = await fetch(`${server.url}/api/vm/watched/watch/home/agentos/nope`);
    assert.equal(response.status, 404);
    assert.equal((await rejection(vm.watch("/home/agentos", { recursive: "yes" as unknown as boolean }))).code, "INVALID_ARGUMENT");
  });

  it("ends with ENOENT when the watched directory is deleted", async () => {
    await vm.mkdir("/home/agentos/doomed", { recursive: true });
    const events: WatchEvent[] = [];
    const watch = await vm.watch("/home/agentos/doomed", { onEvent: (event) => events.push(event) });
    await vm.deleteFile("/home/agentos/doomed", { recursive: true });
    const error = await rejection(watch.closed);
    assert.equal(error.code, "ENOENT");
  });

  it("keeps the VM awake while open, and lets it sleep once closed", async () => {
    const idle = client.vm.getOrCreate("idle");
    const watch = await idle.watch("/home/agentos");
    await new Promise((resolve) => setTimeout(resolve, SLEEP_AFTER_MS * 3));
    assert.equal(await awake("idle"), true, "the VM slept with a watch open");
    await watch.close();
    await waitFor(async () => !(await awake("idle")), "the VM to sleep after its watch closed");
  });

  it("ends with VM_DISPOSED when the VM is destroyed", async () => {
    const doomed = client.vm.getOrCreate("destroyed");
    const watch = await doomed.watch("/home/agentos");
    await doomed.destroy({ confirm: "destroyed" });
    assert.equal((await rejection(watch.closed)).code, "VM_DISPOSED");
  });
});
