/**
 * VM actor lifecycle on a real server: sleep after idle, wake on any action,
 * staying awake while a process runs, state across a full restart, shutdown;
 * and the VM definition's validation.
 *
 * Whether a VM is awake is observed from outside, without touching it: an awake
 * VM has sandboxes on this host (at least its pre-started pool guest) whose
 * command line binds its root directory; a sleeping VM has none. Inside, a VM
 * that slept and woke has a fresh process table.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { after, before, describe, it } from "node:test";
import { agentOS, agentOs, setup, type RunningServer } from "agentvm";
import { AgentVmError, createClient, type VmHandle } from "agentvm/client";
import { sandboxProcessTree, waitFor, rejection, text } from "./helpers.ts";

const SLEEP_AFTER_MS = 200;
const dirs: string[] = [];
const servers: RunningServer[] = [];

after(async () => {
  await Promise.all(servers.map((server) => server.close()));
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

async function tempDir(): Promise<string> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-lifecycle-")));
  dirs.push(dir);
  return dir;
}

/** Host pids of the sandboxes (and their descendants) of VM `key` under `dataDir`; reads /proc only. */
function guestPids(dataDir: string, key: string): number[] {
  return sandboxProcessTree(join(dataDir, "vms", key, "root"));
}

/** Awake or asleep, as the server reports it (the status route does not wake the VM). */
async function awake(url: string, key: string): Promise<boolean> {
  const response = await fetch(`${url}/api/vm/${encodeURIComponent(key)}/status`);
  return ((await response.json()) as { value: { awake: boolean } }).value.awake;
}

/** How often the server has woken VM `key` (its SQLite row; read-only, beside the server's own connection). */
function wakeCount(dataDir: string, key: string): number {
  const db = new DatabaseSync(join(dataDir, "agentvm.sqlite"), { readOnly: true });
  try {
    const row = db.prepare("SELECT wake_count FROM vms WHERE definition = 'vm' AND key = ?").get(key) as { wake_count: number } | undefined;
    return row?.wake_count ?? -1;
  } finally {
    db.close();
  }
}

async function start(definition = agentOS({ sleepAfterMs: SLEEP_AFTER_MS }), dataDir?: string) {
  const registry = setup({ use: { vm: definition } });
  const dir = dataDir ?? (await tempDir());
  const server = await registry.start({ port: 0, dataDir: dir, handleSignals: false });
  servers.push(server);
  return { registry, server, dataDir: dir, client: createClient<typeof registry>(server.url) };
}

async function listening(handle: VmHandle, port: number): Promise<void> {
  await waitFor(async () => {
    try {
      return (await handle.vmFetch(port, "/")).status === 200;
    } catch (error) {
      if ((error as AgentVmError).code === "ECONNREFUSED") return false;
      throw error;
    }
  }, `a guest server on port ${port}`);
}

describe("sleep and wake (sleepAfterMs: 200)", () => {
  let dataDir: string;
  let url: string;
  let client: Awaited<ReturnType<typeof start>>["client"];
  let busy: VmHandle;
  let idle: VmHandle;
  let serverPid: number;

  before(async () => {
    let server: RunningServer;
    ({ dataDir, client, server } = await start());
    url = server.url;
    busy = client.vm.getOrCreate("busy");
    idle = client.vm.getOrCreate("idle");
  });

  it("an idle VM sleeps (its sandboxes go away) while a VM running a server stays awake", async () => {
    // The busy VM's last action comes before the idle VM's, so by the time the idle one
    // has slept, the busy one would have too if a running process did not keep it awake.
    await busy.writeFile("/home/agentos/server.js", `require("http").createServer((q, s) => s.end("still here " + process.pid)).listen(3000);`);
    serverPid = (await busy.spawn("node", ["/home/agentos/server.js"])).pid;
    await listening(busy, 3000);

    await idle.writeFile("/home/agentos/kept.txt", "survives sleep");
    const ran = await idle.exec("node", ["-e", "console.log('ran')"]);
    assert.equal(ran.stdout, "ran\n");
    assert.equal((await idle.listProcesses()).length, 1);
    assert.ok(await awake(url, "idle"), "the idle VM should be awake right after an action");

    await waitFor(async () => !(await awake(url, "idle")), "the idle VM to sleep");
    assert.deepEqual(guestPids(dataDir, "idle"), [], "a sleeping VM keeps no sandbox");
    assert.ok(await awake(url, "busy"), "the VM with a running server process went to sleep");
  });

  it("the VM with a running server still answers vmFetch after more than sleepAfterMs, same process", async () => {
    const response = await busy.vmFetch(3000, "/");
    assert.equal(response.status, 200);
    assert.match(text(response.body), /^still here/);
    const processes = await busy.listProcesses();
    assert.deepEqual(
      processes.filter((process) => process.running).map((process) => process.pid),
      [serverPid],
    );
  });

  it("a woken VM has a fresh process table and its files", async () => {
    assert.ok(!(await awake(url, "idle")));
    assert.deepEqual(await idle.listProcesses(), [], "the exited process of before the sleep is gone: the VM slept and woke");
    assert.equal(text(await idle.readFile("/home/agentos/kept.txt")), "survives sleep");
    const again = await idle.exec("node", ["-e", "console.log(require('fs').readFileSync('/home/agentos/kept.txt', 'utf8'))"]);
    assert.equal(again.stdout, "survives sleep\n");
  });

  it("once its server process is killed, the busy VM sleeps too; its files stay", async () => {
    await busy.killProcess(serverPid, "SIGKILL");
    await busy.waitProcess(serverPid);
    await waitFor(async () => !(await awake(url, "busy")), "the busy VM to sleep after its process ended");
    assert.deepEqual(await busy.listProcesses(), []);
    assert.match(text(await busy.readFile("/home/agentos/server.js")), /still here/);
  });

  for (const [name, action] of [
    ["exists", (vm: VmHandle) => vm.exists("/home/agentos")],
    ["readdir", (vm: VmHandle) => vm.readdir("/home/agentos")],
    ["vmFetch (nothing listening)", (vm: VmHandle) => vm.vmFetch(3000, "/").catch((error: AgentVmError) => assert.equal(error.code, "ECONNREFUSED"))],
    [
      "connect()",
      async (vm: VmHandle) => {
        const connection = vm.connect();
        await connection.ready;
        await connection.dispose();
      },
    ],
  ] as const) {
    it(`${name} wakes a sleeping VM`, async () => {
      await waitFor(async () => !(await awake(url, "idle")), "the idle VM to sleep");
      const wakes = wakeCount(dataDir, "idle");
      await action(idle);
      assert.equal(wakeCount(dataDir, "idle"), wakes + 1);
    });
  }

  it("a preview token survives sleep, and a preview request wakes the VM", async () => {
    const preview = await idle.createSignedPreviewUrl(3000);
    await waitFor(async () => !(await awake(url, "idle")), "the idle VM to sleep");
    const wakes = wakeCount(dataDir, "idle");
    // Nothing listens on 3000 in the woken VM: a valid token gets 502 (a refused one would get 403).
    const response = await fetch(`${url}${preview.path}`);
    assert.equal(response.status, 502, await response.text());
    assert.equal(wakeCount(dataDir, "idle"), wakes + 1, "the preview request did not wake the VM");
    assert.equal((await idle.listPreviewUrls()).length, 1);
    await idle.expireSignedPreviewUrl(preview.token);
    assert.equal((await fetch(`${url}${preview.path}`)).status, 403);
  });

  it("an open connection keeps the VM awake; closing it lets the VM sleep", async () => {
    const connection = idle.connect();
    await connection.ready;
    const exits: number[] = [];
    connection.on("processExit", (event) => exits.push(event.pid));
    // Reference: another VM touched after the connection opened goes to sleep first.
    await busy.exists("/home/agentos");
    await waitFor(async () => !(await awake(url, "busy")), "the reference VM to sleep");
    assert.ok(await awake(url, "idle"), "a VM with an open connection went to sleep");
    const { pid } = await idle.spawn("node", ["-e", "0"]);
    await waitFor(() => exits.includes(pid), "the processExit event on the still-open connection");
    await connection.dispose();
    await waitFor(async () => !(await awake(url, "idle")), "the idle VM to sleep once its connection closed");
  });
});

describe("restart and shutdown", () => {
  it("files and SQLite state survive close() + start() on the same data directory", async () => {
    const first = await start(agentOS());
    const vm = first.client.vm.getOrCreate("persistent");
    const bytes = Uint8Array.from({ length: 256 }, (_, i) => 255 - i);
    await vm.writeFile("/home/agentos/state.bin", bytes);
    await vm.mkdir("/home/agentos/deep/er", { recursive: true });
    await vm.writeFile("/home/agentos/deep/er/note.txt", "note");
    const preview = await vm.createSignedPreviewUrl(3000, 600);
    await first.server.close();

    const db = new DatabaseSync(join(first.dataDir, "agentvm.sqlite"), { readOnly: true });
    const row = db.prepare("SELECT created_at, wake_count FROM vms WHERE definition = 'vm' AND key = 'persistent'").get() as { created_at: number; wake_count: number } | undefined;
    db.close();
    assert.ok(row, "the VM has a row in SQLite");

    // The same registry starts again once its server was closed.
    const second = await first.registry.start({ port: 0, dataDir: first.dataDir, handleSignals: false });
    servers.push(second);
    assert.notEqual(second, first.server);
    const again = createClient<typeof first.registry>(second.url).vm.getOrCreate("persistent");
    assert.deepEqual([...(await again.readFile("/home/agentos/state.bin"))], [...bytes]);
    assert.deepEqual(await again.readdir("/home/agentos/deep/er"), ["note.txt"]);
    assert.deepEqual(await again.listProcesses(), []);
    const previews = await again.listPreviewUrls();
    assert.deepEqual(
      previews.map((info) => ({ port: info.port, expiresAt: info.expiresAt, prefix: preview.token.startsWith(info.tokenPrefix) })),
      [{ port: 3000, expiresAt: preview.expiresAt, prefix: true }],
    );
    // Nothing listens on 3000: a token that survived gets 502 (an unknown one would get 403).
    assert.equal((await fetch(`${second.url}${preview.path}`)).status, 502);
    await second.close();

    const reopened = new DatabaseSync(join(first.dataDir, "agentvm.sqlite"), { readOnly: true });
    const later = reopened.prepare("SELECT created_at, wake_count FROM vms WHERE definition = 'vm' AND key = 'persistent'").get() as { created_at: number; wake_count: number };
    const journal = reopened.prepare("PRAGMA journal_mode").get() as { journal_mode: string };
    reopened.close();
    assert.equal(later.created_at, row.created_at, "created_at is kept across restarts");
    assert.equal(later.wake_count, row.wake_count + 1, "waking after the restart is recorded");
    assert.equal(journal.journal_mode, "wal");
  });

  it("close() ends every guest, fails calls in flight instead of hanging them, and refuses new ones", async () => {
    const { server, dataDir, client } = await start(agentOS());
    const vm = client.vm.getOrCreate("doomed");
    await vm.writeFile("/home/agentos/forever.js", "setInterval(() => {}, 1000);");
    const { pid } = await vm.spawn("node", ["/home/agentos/forever.js"]);
    await vm.spawn("node", ["/home/agentos/forever.js"]);
    const guests = guestPids(dataDir, "doomed");
    assert.ok(guests.length >= 2, `expected sandboxes for the running processes, found ${guests.length}`);
    const waiting = vm.waitProcess(pid);
    waiting.catch(() => {});
    const connection = vm.connect();
    await connection.ready;

    await server.close();
    const alive = guests.filter((guest) => {
      try {
        return !readFileSync(`/proc/${guest}/stat`, "utf8").includes(") Z ");
      } catch {
        return false;
      }
    });
    assert.deepEqual(alive, [], "guest sandboxes still running after close() resolved");
    const inFlight = await rejection(waiting);
    assert.ok(inFlight instanceof AgentVmError);
    assert.equal((await rejection(vm.exists("/"))).code, "SERVER_UNREACHABLE");
    // An open event connection tells its user it is gone rather than going quiet.
    const dropped = await rejection(connection.closed);
    assert.ok(dropped instanceof AgentVmError);
    assert.equal(dropped.code, "ECONNRESET");
    await connection.dispose();
  });

  it("start() fails clearly on a port in use, and the registry can start again afterwards", async () => {
    const first = await start(agentOS());
    const registry = setup({ use: { vm: agentOS() } });
    const dataDir = await tempDir();
    const error = await rejection(registry.start({ port: first.server.port, host: "127.0.0.1", dataDir, handleSignals: false }));
    assert.equal(error.code, "EADDRINUSE");
    assert.match(error.message, new RegExp(String(first.server.port)));
    const second = await registry.start({ port: 0, host: "127.0.0.1", dataDir, handleSignals: false });
    servers.push(second);
    assert.equal((await fetch(`${second.url}/health`)).status, 200);
    await second.close();
    await first.server.close();
  });
});

describe("definition config", () => {
  const rejects = (make: () => unknown, field: RegExp) =>
    assert.throws(make, (error: AgentVmError) => {
      assert.equal(error.code, "INVALID_ARGUMENT", error.message);
      assert.match(error.message, field);
      return true;
    });

  it("unknown keys are errors naming the key", () => {
    rejects(() => agentOS({ nope: 1 } as never), /nope/);
    rejects(() => agentOs({ options: { nope: 1 } } as never), /options\.nope/);
    rejects(() => agentOS({ preview: { nope: 1 } } as never), /preview\.nope/);
    rejects(() => agentOS({ listen: { portmin: 3000 } } as never), /portmin/);
  });

  it("bad listen values are errors naming the field", () => {
    rejects(() => agentOS({ listen: { portMin: 0 } }), /listen\.portMin/);
    rejects(() => agentOS({ listen: { portMax: 70000 } }), /listen\.portMax/);
    rejects(() => agentOS({ listen: { portMin: 1.5 } }), /listen\.portMin/);
    rejects(() => agentOS({ listen: { portMin: 5000, portMax: 4000 } }), /portMin.*portMax|portMax.*portMin/);
    rejects(() => agentOS({ listen: { allowPrivileged: "yes" } } as never), /listen\.allowPrivileged/);
    rejects(() => agentOs({ options: { listen: { portMin: 0 } } }), /options\.listen\.portMin/);
  });

  it("bad preview values are errors naming the field", () => {
    rejects(() => agentOS({ preview: { defaultExpiresInSeconds: -1 } }), /preview\.defaultExpiresInSeconds/);
    rejects(() => agentOS({ preview: { defaultExpiresInSeconds: Number.NaN } }), /preview\.defaultExpiresInSeconds/);
    rejects(() => agentOS({ preview: { maxExpiresInSeconds: "1h" } } as never), /preview\.maxExpiresInSeconds/);
    rejects(() => agentOS({ preview: { maxExpiresInSeconds: Number.POSITIVE_INFINITY } }), /preview\.maxExpiresInSeconds/);
    rejects(() => agentOS({ preview: { defaultExpiresInSeconds: 7200, maxExpiresInSeconds: 3600 } }), /defaultExpiresInSeconds.*maxExpiresInSeconds/);
    rejects(() => agentOS({ preview: "1h" } as never), /preview/);
  });

  it("software both at the top and under options is an error naming both", () => {
    rejects(() => agentOs({ software: [], options: { software: [] } }), /config\.software.*config\.options\.software/);
    rejects(() => agentOS({ software: "common" } as never), /software/);
  });

  it("other bad values name their field", () => {
    rejects(() => agentOS({ sleepAfterMs: -1 }), /sleepAfterMs/);
    rejects(() => agentOS({ limits: { maxProcesses: 0 } } as never), /maxProcesses/);
    rejects(() => setup({ use: {} }), /use/);
    rejects(() => setup({ use: { vm: { software: [] } } } as never), /use\.vm/);
  });

  it("registry.start() options are validated", async () => {
    const registry = setup({ use: { vm: agentOS() } });
    assert.equal((await rejection(registry.start({ bogus: 1 } as never))).code, "INVALID_ARGUMENT");
    const badPort = await rejection(registry.start({ port: 70_000, handleSignals: false }));
    assert.equal(badPort.code, "INVALID_ARGUMENT");
    assert.match(badPort.message, /port/);
  });

  it("the seed shapes are accepted", () => {
    const common = { name: "common" };
    const pi = { name: "pi" };
    const rivet = agentOs({
      preview: { defaultExpiresInSeconds: 3600, maxExpiresInSeconds: 86400 },
      options: { software: [common, pi] },
    });
    // Matched by name to the catalog of agentvm/software.
    assert.deepEqual(rivet.software.map((entry) => entry.name), ["common", "pi"]);
    assert.equal(rivet.software[0]?.kind, "agentvm-software");
    assert.throws(() => agentOs({ options: { software: [{ name: "no-such-software" }] } }), { code: "INVALID_ARGUMENT", message: /software\[0\].*no-such-software.*common.*pi/s });
    assert.equal(rivet.preview.defaultExpiresInSeconds, 3600);
    assert.equal(rivet.preview.maxExpiresInSeconds, 86400);
    assert.ok(agentOS({ software: [] }));
    assert.ok(
      agentOS({
        permissions: { network: { default: "deny", rules: [{ mode: "allow", operations: ["*"], patterns: ["api.example.com"] }] } },
      }),
    );
    assert.equal(agentOS({ listen: { portMin: 3000, portMax: 9000, allowPrivileged: false } }).listen.portMin, 3000);
    assert.ok(setup({ use: { vm: rivet } }));
  });

  it("the listen policy of a definition reaches its VMs through the server", async () => {
    const { client } = await start(agentOS({ listen: { portMin: 3000, portMax: 9000 } }));
    const vm = client.vm.getOrCreate("policy");
    const probe = (port: number) =>
      vm.exec("node", [
        "-e",
        `require("net").createServer().once("error", (e) => { console.log(e.code); process.exit(0); }).listen(${port}, () => { console.log("ok"); process.exit(0); })`,
      ]);
    assert.equal((await probe(80)).stdout, "EACCES\n");
    assert.equal((await probe(9500)).stdout, "EACCES\n");
    assert.equal((await probe(3001)).stdout, "ok\n");
  });
});
