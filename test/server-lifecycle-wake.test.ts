/**
 * VM lifecycle bounds and restart on wake (issue 10, deliverable 5), on a real
 * server with real guests: processes spawned with restartOnWake and a
 * definition's services start again when the VM wakes, so a preview of a
 * sleeping dev server serves again; an idle timeout puts a VM with running
 * processes to sleep; a VM past its maxLifetimeSeconds is destroyed; the VM
 * list reports disk use.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { tempDataDir, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;
delete process.env.AGENTVM_TOKEN;

const SERVER_FILE = "/home/agentos/dev-server.cjs";
const DEV_SERVER = 'require("http").createServer((req, res) => res.end("dev server says " + req.url)).listen(3000);';

const registry = setup({
  use: {
    // Running processes would keep a VM awake for ever; the idle timeout lets it sleep anyway.
    dev: agentOS({ sleepAfterMs: 200, lifecycle: { idleTimeoutSeconds: 1 } }),
    declared: agentOS({ sleepAfterMs: 200, lifecycle: { idleTimeoutSeconds: 1 }, services: [{ command: "node", args: [SERVER_FILE] }] }),
    shortLived: agentOS({ sleepAfterMs: 200, lifecycle: { maxLifetimeSeconds: 3 } }),
  },
});
let server: RunningServer;
let client: ReturnType<typeof createClient<typeof registry>>;

before(async () => {
  server = await registry.start({ port: 0, dataDir: await tempDataDir("agentvm-wake-"), handleSignals: false });
  client = createClient<typeof registry>(server.url);
});
after(() => server?.close());

async function awake(definition: string, key: string): Promise<boolean> {
  const response = await fetch(`${server.url}/api/${definition}/${key}/status`);
  return ((await response.json()) as { value: { awake: boolean } }).value.awake;
}

async function fetchText(url: string): Promise<{ status: number; text: string }> {
  const response = await fetch(url);
  return { status: response.status, text: await response.text() };
}

async function listening(vm: VmHandle): Promise<void> {
  await waitFor(async () => (await vm.listeningPorts()).includes(3000), "the dev server to listen on 3000", 20_000);
}

describe("restart on wake", () => {
  it("a server spawned with restartOnWake serves its preview again after the VM slept", async () => {
    const vm = client.dev.getOrCreate("restarting");
    await vm.writeFile(SERVER_FILE, DEV_SERVER);
    await vm.spawn("node", [SERVER_FILE], { restartOnWake: true });
    await listening(vm);
    const preview = await vm.createSignedPreviewUrl(3000);
    assert.deepEqual(await fetchText(`${preview.url}first`), { status: 200, text: "dev server says /first" });

    // No client for idleTimeoutSeconds: the VM sleeps although its server runs.
    await waitFor(async () => !(await awake("dev", "restarting")), "the VM to sleep past its idle timeout", 20_000);
    assert.deepEqual(await fetchText(`${preview.url}after-sleep`), { status: 200, text: "dev server says /after-sleep" });
    assert.equal(await awake("dev", "restarting"), true);

    // vmFetch through the API right after a wake waits for it too.
    await waitFor(async () => !(await awake("dev", "restarting")), "the VM to sleep again", 20_000);
    const fetched = await vm.vmFetch(3000, "/api-after-sleep");
    assert.equal(fetched.status, 200);
    assert.equal(new TextDecoder().decode(fetched.body), "dev server says /api-after-sleep");
  });

  it("killProcess on it stops the restarting: after the next sleep the preview has nothing to reach", async () => {
    const vm = client.dev.getOrCreate("restarting");
    const [running] = (await vm.listProcesses()).filter((process) => process.running && process.args.includes(SERVER_FILE));
    assert.ok(running, "the restarted dev server is in the process list");
    await vm.killProcess(running.pid);
    const preview = await vm.createSignedPreviewUrl(3000);
    await waitFor(async () => !(await awake("dev", "restarting")), "the VM to sleep", 20_000);
    const answer = await fetchText(`${preview.url}gone`);
    assert.equal(answer.status, 502, answer.text);
  });

  it("restartOnWake is validated", async () => {
    const vm = client.dev.getOrCreate("restarting");
    const error = await vm.spawn("node", ["-e", "0"], { restartOnWake: "yes" as never }).then(
      () => undefined,
      (caught: { code?: string; message: string }) => caught,
    );
    assert.equal(error?.code, "INVALID_ARGUMENT");
    assert.match(error!.message, /restartOnWake must be a boolean/);
  });

  it("a definition's services start whenever its VMs wake", async () => {
    const vm = client.declared.getOrCreate("svc");
    // On the first wake the file is not there yet: the service exits at once, and the VM wakes regardless.
    await vm.writeFile(SERVER_FILE, DEV_SERVER);
    const preview = await vm.createSignedPreviewUrl(3000);
    await waitFor(async () => !(await awake("declared", "svc")), "the VM to sleep", 20_000);
    assert.deepEqual(await fetchText(`${preview.url}declared`), { status: 200, text: "dev server says /declared" });
  });
});

describe("lifetime and disk use", () => {
  it("the VM list reports the disk use measured when a VM last slept", async () => {
    const vm = client.shortLived.getOrCreate("disk");
    await vm.writeFile("/home/agentos/blob.bin", new Uint8Array(256 * 1024).fill(1));
    assert.equal(server.listVms("shortLived").find((entry) => entry.key === "disk")?.diskBytes, null, "not measured before its first sleep");
    // Measured as the sleep finishes (just after the VM stops counting as awake).
    const listed = await waitFor(() => server.listVms("shortLived").find((entry) => entry.key === "disk" && entry.diskBytes !== null), "the VM to sleep and its disk use to be measured", 20_000);
    assert.ok(listed.diskBytes! >= 256 * 1024, `diskBytes ${listed.diskBytes}`);
  });

  it("setLifecycle gives one VM bounds of its own: a lifetime its definition does not have ends it", async () => {
    const vm = client.dev.getOrCreate("own-lifetime");
    await vm.writeFile("/home/agentos/x", "x");
    const error = await vm.setLifecycle({ maxLifetimeSeconds: -1 }).then(
      () => undefined,
      (caught: { code?: string }) => caught.code,
    );
    assert.equal(error, "INVALID_ARGUMENT");
    const bounds = await vm.setLifecycle({ maxLifetimeSeconds: 2 });
    assert.equal(bounds.maxLifetimeSeconds, 2);
    assert.equal(bounds.idleTimeoutSeconds, 1, "the definition's idle timeout stays in force");
    assert.ok(bounds.expiresAt !== null && bounds.expiresAt > Date.now() - 60_000);
    assert.deepEqual(await vm.setLifecycle({ idleTimeoutSeconds: 30 }).then((b) => [b.maxLifetimeSeconds, b.idleTimeoutSeconds]), [2, 30]);
    assert.deepEqual(await vm.setLifecycle({ idleTimeoutSeconds: null }).then((b) => [b.maxLifetimeSeconds, b.idleTimeoutSeconds]), [2, 1]);
    await waitFor(() => !server.listVms("dev").some((entry) => entry.key === "own-lifetime"), "the VM to be destroyed at the end of its own lifetime", 20_000);
    assert.equal(await vm.exists("/home/agentos/x"), false);
  });

  it("a VM past lifecycle.maxLifetimeSeconds is destroyed, asleep or awake; its key then starts a fresh VM", async () => {
    const asleep = client.shortLived.getOrCreate("mayfly");
    const busy = client.shortLived.getOrCreate("mayfly-busy");
    await asleep.writeFile("/home/agentos/note.txt", "short life");
    await busy.spawn("sleep", ["600"]);
    const directory = join(server.dataDir, "vms", "mayfly");
    assert.equal(existsSync(directory), true);
    await waitFor(() => server.listVms("shortLived").every((entry) => !entry.key.startsWith("mayfly")), "both VMs to be destroyed", 20_000);
    assert.equal(existsSync(directory), false);
    assert.equal(await asleep.exists("/home/agentos/note.txt"), false);
    assert.equal((await busy.listProcesses()).filter((process) => process.running && process.command === "sleep").length, 0);
  });
});
