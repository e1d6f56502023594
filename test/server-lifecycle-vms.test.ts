/**
 * Listing and destroying VMs (issue 10, deliverable 5) on a real server over
 * HTTP, with real guests: the listing's awake/asleep, the typed confirmation,
 * what a destroy ends and removes (processes, files, rows, preview tokens,
 * event streams), the key starting fresh, token scope, and an interrupted
 * destroy that the next one finishes.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { after, before, describe, it } from "node:test";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { rejection, sandboxProcessTree, tempDataDir, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;
delete process.env.AGENTVM_TOKEN;

const SLEEP_AFTER_MS = 300;
const FORBIDDEN_BODY = "Forbidden: this preview link is invalid, expired or revoked.\n";
const apiKey = generateApiKey();
const registry = setup({ use: { vm: agentOS({ sleepAfterMs: SLEEP_AFTER_MS }) } });
let server: RunningServer;
let client: ReturnType<typeof createClient<typeof registry>>;

before(async () => {
  server = await registry.start({ port: 0, dataDir: await tempDataDir("agentvm-vms-"), handleSignals: false, auth: { apiKeys: [apiKey] } });
  client = createClient<typeof registry>({ endpoint: server.url, token: apiKey });
});
after(() => server?.close());

function vmDir(key: string): string {
  return join(server.dataDir, "vms", key);
}

/** Rows about VM `key` in SQLite, read beside the server's own connection. */
function rows(key: string): { vms: number; previews: number } {
  const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"), { readOnly: true });
  try {
    const count = (table: string) => Number((db.prepare(`SELECT COUNT(*) AS n FROM ${table} WHERE definition = 'vm' AND key = ?`).get(key) as { n: number }).n);
    return { vms: count("vms"), previews: count("previews") };
  } finally {
    db.close();
  }
}

function raw(path: string, init: RequestInit = {}, credential = apiKey): Promise<Response> {
  return fetch(`${server.url}${path}`, { ...init, headers: { authorization: `Bearer ${credential}`, ...(init.headers as Record<string, string>) } });
}

const HELLO = 'require("http").createServer((req, res) => res.end("hello " + req.url)).listen(3000);';

async function startHello(vm: VmHandle): Promise<number> {
  await vm.writeFile("/home/agentos/hello.cjs", HELLO);
  const { pid } = await vm.spawn("node", ["/home/agentos/hello.cjs"]);
  await waitFor(async () => (await vm.listeningPorts()).includes(3000), "the guest server to listen on 3000", 20_000);
  return pid;
}

describe("list VMs", () => {
  it("lists created VMs in key order with awake and asleep, pages with after/limit, and needs an API key", async () => {
    const busy = client.vm.getOrCreate("list-busy");
    const idle = client.vm.getOrCreate("list-idle");
    await busy.spawn("sleep", ["60"]);
    await idle.writeFile("/home/agentos/a.txt", "a");
    const listed = await waitFor(async () => {
      const vms = (await client.vm.list()).filter((vm) => vm.key.startsWith("list-"));
      return vms.length === 2 && !vms[1]!.awake ? vms : undefined;
    }, "list-idle to fall asleep", 10_000);
    assert.deepEqual(listed.map((vm) => [vm.key, vm.awake]), [["list-busy", true], ["list-idle", false]]);
    for (const vm of listed) {
      assert.ok(vm.createdAt > 0 && vm.lastActiveAt >= vm.createdAt, JSON.stringify(vm));
      assert.equal(vm.destroying, undefined);
    }

    const first = await client.vm.list({ after: "list-", limit: 1 });
    assert.deepEqual(first.map((vm) => vm.key), ["list-busy"]);
    assert.deepEqual((await client.vm.list({ after: "list-busy", limit: 1 })).map((vm) => vm.key), ["list-idle"]);
    assert.equal((await rejection(client.vm.list({ limit: 0 }))).code, "INVALID_ARGUMENT");

    const token = server.createToken({ key: "list-busy" });
    const scoped = createClient<typeof registry>({ endpoint: server.url, token: token.token });
    assert.equal((await rejection(scoped.vm.list())).code, "FORBIDDEN");
    const anonymous = await fetch(`${server.url}/api/vm/vms`);
    assert.equal(anonymous.status, 401);
    assert.deepEqual(server.listVms("vm", { after: "list-", limit: 2 }).map((vm) => vm.key), ["list-busy", "list-idle"]);
    await busy.destroy({ confirm: "list-busy" });
  });
});

describe("destroy a VM", () => {
  it("without or with a wrong confirmation is refused with DESTROY_NOT_CONFIRMED and changes nothing", async () => {
    const vm = client.vm.getOrCreate("keep-me");
    await vm.writeFile("/home/agentos/keep.txt", "kept");
    const { pid } = await vm.spawn("sleep", ["60"]);

    const missing = await raw("/api/vm/keep-me", { method: "DELETE" });
    assert.equal(missing.status, 400);
    const body = (await missing.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, "DESTROY_NOT_CONFIRMED");
    assert.match(body.error.message, /\?confirm=keep-me/, "the message says how to confirm");
    assert.equal((await rejection(vm.destroy({ confirm: "keep-me-not" }))).code, "DESTROY_NOT_CONFIRMED");
    assert.equal((await rejection(vm.destroy(undefined as unknown as { confirm: string }))).code, "DESTROY_NOT_CONFIRMED");
    assert.equal((await rejection(client.vm.getOrCreate("keep-other").destroy({ confirm: "keep-me" }))).code, "DESTROY_NOT_CONFIRMED");

    assert.equal(Buffer.from(await vm.readFile("/home/agentos/keep.txt")).toString(), "kept");
    assert.ok((await vm.listProcesses()).some((process) => process.pid === pid && process.running), "its process still runs");
    assert.equal(rows("keep-me").vms, 1);
    await vm.destroy({ confirm: "keep-me" });
  });

  it("ends its processes, removes its files, rows and preview tokens, ends event streams; the key then starts fresh", async () => {
    const key = "doomed";
    const vm = client.vm.getOrCreate(key);
    await vm.writeFile("/home/agentos/marker.txt", "old life");
    await vm.spawn("sleep", ["300"]);
    await startHello(vm);
    const preview = await vm.createSignedPreviewUrl(3000);
    const before = await fetch(`${server.previewUrl}${preview.path}x`);
    assert.equal(before.status, 200);
    assert.equal(await before.text(), "hello /x");
    const createdAt = (await client.vm.list()).find((entry) => entry.key === key)!.createdAt;
    assert.ok(sandboxProcessTree(join(vmDir(key), "root")).length > 0, "the VM has host processes");
    assert.ok(existsSync(join(vmDir(key), "root")));
    assert.deepEqual(rows(key), { vms: 1, previews: 1 });
    const connection = vm.connect();
    await connection.ready;

    const result = await vm.destroy({ confirm: key });
    assert.deepEqual(result, { key, existed: true });

    assert.deepEqual(sandboxProcessTree(join(vmDir(key), "root")), [], "no process of the VM is left");
    assert.equal(existsSync(vmDir(key)), false, "its directory is gone");
    assert.deepEqual(rows(key), { vms: 0, previews: 0 });
    const revoked = await fetch(`${server.previewUrl}${preview.path}x`);
    assert.equal(revoked.status, 403);
    assert.equal(await revoked.text(), FORBIDDEN_BODY);
    assert.equal((await rejection(connection.closed)).code, "VM_DISPOSED", "an open event stream is ended, saying why");
    assert.ok(!(await client.vm.list()).some((entry) => entry.key === key), "no longer listed");

    // Destroying again is not an error: there is nothing left.
    assert.deepEqual(await vm.destroy({ confirm: key }), { key, existed: false });

    // The key starts a fresh, empty VM.
    assert.equal(await vm.exists("/home/agentos/marker.txt"), false);
    assert.deepEqual(await vm.listProcesses(), []);
    assert.equal((await vm.listPreviewUrls()).length, 0);
    const fresh = (await client.vm.list()).find((entry) => entry.key === key);
    assert.ok(fresh && fresh.createdAt >= createdAt && fresh.wakeCount === 0, JSON.stringify(fresh));
    await vm.destroy({ confirm: key });
  });

  it("a token scoped to another VM, or a \"*\" token, cannot destroy; a token listing destroy for this VM can", async () => {
    const key = "victim";
    const owner = client.vm.getOrCreate(key);
    await owner.writeFile("/home/agentos/v.txt", "still here");
    const asToken = (token: string) => createClient<typeof registry>({ endpoint: server.url, token }).vm.getOrCreate(key);

    const other = server.createToken({ key: "attacker", actions: ["destroy"] });
    assert.equal((await rejection(asToken(other.token).destroy({ confirm: key }))).code, "FORBIDDEN");
    const everything = server.createToken({ key, actions: "*" });
    const star = await rejection(asToken(everything.token).destroy({ confirm: key }));
    assert.equal(star.code, "FORBIDDEN");
    assert.match(star.message, /must list/);
    const readOnly = server.createToken({ key, actions: ["readFile"] });
    assert.equal((await rejection(asToken(readOnly.token).destroy({ confirm: key }))).code, "FORBIDDEN");
    assert.equal(Buffer.from(await owner.readFile("/home/agentos/v.txt")).toString(), "still here");
    assert.equal(existsSync(vmDir(key)), true);

    const allowed = server.createToken({ key, actions: ["destroy"] });
    assert.deepEqual(await asToken(allowed.token).destroy({ confirm: key }), { key, existed: true });
    assert.equal(existsSync(vmDir(key)), false);
  });

  it("a destroy interrupted midway (row marked, files left) keeps the VM from waking until the next destroy finishes", async () => {
    const key = "half";
    const vm = client.vm.getOrCreate(key);
    await vm.writeFile("/home/agentos/h.txt", "h");
    // What a crash between the first and last step leaves: the row marked `destroying`, files on disk.
    await waitFor(async () => !(await client.vm.list()).find((entry) => entry.key === key)?.awake, "the VM to sleep", 10_000);
    const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"));
    try {
      db.exec("PRAGMA busy_timeout = 5000");
      db.prepare("UPDATE vms SET destroying = 1 WHERE definition = 'vm' AND key = ?").run(key);
    } finally {
      db.close();
    }
    assert.equal((await client.vm.list()).find((entry) => entry.key === key)?.destroying, true);
    const refused = await rejection(vm.exists("/home/agentos/h.txt"));
    assert.equal(refused.code, "VM_DESTROY_FAILED");
    assert.match(refused.message, /destroy it again/);
    assert.equal(existsSync(vmDir(key)), true, "the refused wake did not touch the files");

    assert.deepEqual(await vm.destroy({ confirm: key }), { key, existed: true });
    assert.equal(existsSync(vmDir(key)), false);
    assert.equal(await vm.exists("/home/agentos/h.txt"), false, "then the key starts fresh");
    await vm.destroy({ confirm: key });
  });
});
