/**
 * The seed pages (agentOS "Networking & Previews", both the agentOS and the
 * RivetKit version) run as tests: their server and client files, with only the
 * import paths changed (fixtures under test/seeds/, stored as *.ts.txt so the
 * repo's typecheck leaves them alone), are written to a temp directory that
 * resolves `agentvm` through node_modules/agentvm → this repo. The server file
 * runs as a real child process; each client file runs as its own process
 * against it, with only "http://localhost:6420" rewritten to the chosen port.
 *
 * Test glue (never the seed code) waits for ports, kills and restarts guest
 * servers and swaps in an echo server so that what the guest received can be
 * asserted on.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import type { Registry, VmDefinition } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { sandboxProcessTree, waitFor } from "./helpers.ts";
import { appDir, assertRan, childEnv, freePort, NODE, runClient } from "./seed-support.ts";


/** A guest HTTP server (test glue, not seed code) that answers with what it received. */
const ECHO_SERVER = `require("http").createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    res.setHeader("x-echo", "1");
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString() }));
  });
}).listen(3000);`;

class SeedServer {
  readonly child: ChildProcess;
  readonly port: number;
  readonly dir: string;
  stdout = "";
  stderr = "";
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(dir: string, port: number, file = "server.ts") {
    this.dir = dir;
    this.port = port;
    this.child = spawn(NODE, ["--conditions=agentvm-source", file], {
      cwd: dir,
      env: childEnv({ PORT: String(port), AGENTVM_DATA_DIR: join(dir, "data") }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stdout!.on("data", (chunk) => (this.stdout += chunk));
    this.child.stderr!.on("data", (chunk) => (this.stderr += chunk));
    this.exited = new Promise((resolve) => this.child.once("exit", (code, signal) => resolve({ code, signal })));
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Resolves once GET /health answers; fails early if the server exits. */
  async listening(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.running) throw new Error(`seed server exited before listening\nstdout: ${this.stdout}\nstderr: ${this.stderr}`);
      try {
        const response = await fetch(`http://localhost:${this.port}/health`);
        if (response.ok) return;
      } catch {
        // not yet
      }
      if (Date.now() > deadline) throw new Error(`seed server did not listen on ${this.port} within ${timeoutMs} ms\nstderr: ${this.stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  /** Host pids of this server's guests: sandboxes whose command line names its data dir, and their descendants. */
  guestPids(): number[] {
    return sandboxProcessTree(join(this.dir, "data", "vms"), this.child.pid!);
  }

  async stop(): Promise<void> {
    if (this.running) this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 15_000);
    await this.exited;
    clearTimeout(timer);
  }
}

function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return false;
  }
}

type SeedRegistry = Registry<{ vm: VmDefinition }>;

/** Test glue: a handle on the seed's VM from this process. */
function glue(port: number, key: string | string[]): VmHandle {
  return createClient<SeedRegistry>(`http://localhost:${port}`).vm.getOrCreate(key);
}

/** vmFetch until the port answers (the guest server may still be starting). */
async function fetchWhenListening(agent: VmHandle, port: number, path = "/") {
  return waitFor(async () => {
    try {
      return await agent.vmFetch(port, path);
    } catch (error) {
      if ((error as { code?: string }).code === "ECONNREFUSED") return undefined;
      throw error;
    }
  }, `a guest server on port ${port}`);
}

/** Kills every running process in the VM, then starts the echo server on 3000 and waits for it. */
async function replaceWithEcho(agent: VmHandle, file: string): Promise<void> {
  for (const info of await agent.listProcesses()) {
    if (!info.running) continue;
    await agent.killProcess(info.pid, "SIGKILL");
    await agent.waitProcess(info.pid);
  }
  await agent.writeFile(file, ECHO_SERVER);
  await agent.spawn("node", [file]);
  await waitFor(async () => {
    try {
      return (await agent.vmFetch(3000, "/")).headers["x-echo"] === "1";
    } catch (error) {
      if ((error as { code?: string }).code === "ECONNREFUSED") return false;
      throw error;
    }
  }, "the echo server on port 3000");
}

/** The JSON printed after each "Body: " by a seed client talking to the echo server. */
function echoedBodies(stdout: string): { method: string; url: string; headers: Record<string, string>; body: string }[] {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("Body: "))
    .map((line) => JSON.parse(line.slice("Body: ".length)));
}

/** SIGTERM → exit 0 with every guest gone. */
async function assertCleanShutdown(server: SeedServer): Promise<void> {
  const guests = server.guestPids();
  assert.ok(guests.length > 0, "expected live guest processes before shutdown");
  server.child.kill("SIGTERM");
  const { code, signal } = await server.exited;
  assert.equal(signal, null, `server died of ${signal}; stderr: ${server.stderr}`);
  assert.equal(code, 0, `server exited with ${code}; stderr: ${server.stderr}`);
  assert.match(server.stdout, /SIGTERM/);
  // Exit waits for every guest; allow only for the kernel reaping sandboxes whose parent just died.
  await waitFor(() => guests.every((pid) => !alive(pid)), `guests ${guests.filter(alive).join(", ")} of the stopped server to exit`, 5_000);
  assert.deepEqual(server.guestPids(), []);
}

const cleanup: (() => Promise<void>)[] = [];
after(async () => {
  for (const step of cleanup.splice(0).reverse()) await step();
});

async function startSeedServer(page: string, files: Record<string, string>): Promise<SeedServer> {
  const port = await freePort();
  const dir = await appDir(page, files, port);
  cleanup.push(() => rm(dir, { recursive: true, force: true }));
  const server = new SeedServer(dir, port);
  cleanup.push(() => server.stop());
  await server.listening();
  return server;
}

describe("seed: Networking & Previews (agentOS page)", () => {
  const page = "networking-and-previews";
  let server: SeedServer;

  before(async () => {
    server = await startSeedServer(page, {
      "server.ts": "server.ts.txt",
      "client-start.ts": "client-start.ts.txt",
      "client-fetch.ts": "client-fetch.ts.txt",
      "client-preview.ts": "client-preview.ts.txt",
    });
  });

  it("client-start: writes the guest server and spawns it", async () => {
    const result = await runClient(server.dir, "client-start.ts");
    assertRan(result, "client-start.ts");
    assert.match(result.stdout, /^server pid: \d+$/m);
    const pid = Number(/server pid: (\d+)/.exec(result.stdout)![1]);
    const agent = glue(server.port, "my-agent");
    const info = (await agent.listProcesses()).find((process) => process.pid === pid);
    assert.deepEqual(info && { command: info.command, args: info.args, running: info.running }, {
      command: "node",
      args: ["/home/agentos/server.js"],
      running: true,
    });
    assert.match(new TextDecoder().decode(await agent.readFile("/home/agentos/server.js")), /Hello from inside the VM/);
  });

  it("client-fetch: GET and POST reach the seed's guest server", async () => {
    // The page runs this "with the HTTP server running in the VM (above)": wait for it to listen.
    await fetchWhenListening(glue(server.port, "my-agent"), 3000);
    const result = await runClient(server.dir, "client-fetch.ts");
    assertRan(result, "client-fetch.ts");
    const lines = result.stdout.split("\n");
    assert.equal(lines[0], "Status: 200");
    assert.equal(lines[1], "Body: Hello from inside the VM");
    assert.equal(lines[2], "Status: 200 OK");
    assert.match(result.stdout, /Headers: \{[^}]*'content-type': 'text\/plain'/s);
    assert.equal(lines.filter((line) => line === "Body: Hello from inside the VM").length, 2);
  });

  it("client-fetch: method, headers and body reach the guest (echo server on port 3000)", async () => {
    await replaceWithEcho(glue(server.port, "my-agent"), "/home/agentos/echo.js");
    const result = await runClient(server.dir, "client-fetch.ts");
    assertRan(result, "client-fetch.ts");
    const [get, post] = echoedBodies(result.stdout);
    assert.equal(get?.method, "GET");
    assert.equal(get?.url, "/");
    assert.equal(post?.method, "POST");
    assert.equal(post?.url, "/api/data");
    assert.equal(post?.headers["content-type"], "application/json");
    assert.equal(post?.body, JSON.stringify({ key: "value" }));
    assert.equal(post?.headers["x-agentvm-forward-headers"], undefined, "the client's bookkeeping header must not reach the guest");
    assert.match(result.stdout, /^Status: 200 OK$/m);
    assert.match(result.stdout, /'x-echo': '1'/);
  });

  it("client-preview: createSignedPreviewUrl(3000, 300) mints a 5-minute preview that proxies to port 3000", async () => {
    const before = Date.now();
    const result = await runClient(server.dir, "client-preview.ts");
    assertRan(result, "client-preview.ts");
    const path = /^Preview path: (\/preview\/\S+\/)$/m.exec(result.stdout)?.[1];
    assert.ok(path, `no preview path printed: ${result.stdout}`);
    const expires = new Date(/^Expires at: (.+)$/m.exec(result.stdout)![1]!).getTime();
    // Date's default string has whole seconds.
    assert.ok(expires >= before + 299_000 && expires <= Date.now() + 300_000, `expires ${expires - before} ms after the call`);
    // Test glue: the echo server from the previous test answers through the preview.
    const response = await fetch(`http://localhost:${server.port}${path}hello?x=1`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("access-control-allow-origin"), "*");
    const echoed = (await response.json()) as { url: string };
    assert.equal(echoed.url, "/hello?x=1");
  });

  it("SIGTERM stops the server cleanly: exit 0, guests gone", async () => {
    await assertCleanShutdown(server);
  });
});

describe("seed: Networking & Previews (RivetKit page)", () => {
  const page = "networking-and-previews-rivetkit";
  let server: SeedServer;

  before(async () => {
    server = await startSeedServer(page, {
      "server.ts": "server.ts.txt",
      "common.ts": "common.ts.txt",
      "pi.ts": "pi.ts.txt",
      "client-fetch.ts": "client-fetch.ts.txt",
      "client-fetch-options.ts": "client-fetch-options.ts.txt",
    });
  });

  it("server: agentOs({ options: { software: [common, pi] } }): a VM has the common commands and runs pi", async () => {
    const exec = async (command: string, args: string[]) => {
      const response = await fetch(`http://localhost:${server.port}/api/vm/software-check/actions/exec`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify([command, args]),
      });
      assert.equal(response.status, 200, await response.clone().text());
      return ((await response.json()) as { value: { exitCode: number; stdout: string; stderr: string } }).value;
    };
    const common = await exec("sh", ["-c", "ls / | grep -c . && git --version && curl --version | head -1"]);
    assert.equal(common.exitCode, 0, common.stderr);
    assert.match(common.stdout, /git version/);
    const pi = await exec("pi", ["--version"]);
    assert.equal(pi.exitCode, 0, pi.stderr);
    assert.match(pi.stdout + pi.stderr, /\d+\.\d+\.\d+/); // pi prints its version on stderr
  });

  it("client-fetch: writes /home/user/server.js, spawns it, vmFetch GET answers 'Hello from VM'", async () => {
    // The seed spawns the guest server and fetches at once, with no retry: vmFetch
    // must wait for a just-started program to reach listen() (no ECONNREFUSED race).
    const result = await runClient(server.dir, "client-fetch.ts");
    assertRan(result, "client-fetch.ts");
    assert.equal(result.stdout, "Status: 200\nBody: Hello from VM\n");
  });

  it("client-fetch-options: POST with headers and body answers 200 OK", async () => {
    const result = await runClient(server.dir, "client-fetch-options.ts");
    assertRan(result, "client-fetch-options.ts");
    const lines = result.stdout.split("\n");
    assert.equal(lines[0], "Status: 200 OK");
    assert.match(lines[1]!, /^Headers: \{/);
    assert.match(result.stdout, /^Body: Hello from VM$/m);
  });

  it("client-fetch-options: method, headers and body reach the guest (echo server on port 3000)", async () => {
    await replaceWithEcho(glue(server.port, ["my-agent"]), "/home/user/echo.js");
    const result = await runClient(server.dir, "client-fetch-options.ts");
    assertRan(result, "client-fetch-options.ts");
    const [post] = echoedBodies(result.stdout);
    assert.equal(post?.method, "POST");
    assert.equal(post?.url, "/api/data");
    assert.equal(post?.headers["content-type"], "application/json");
    assert.equal(post?.headers["content-length"], String(JSON.stringify({ key: "value" }).length));
    assert.equal(post?.body, '{"key":"value"}');
    assert.match(result.stdout, /'x-echo': '1'/);
  });

  it("\"my-agent\" and [\"my-agent\"] are the same VM", async () => {
    assert.ok(await glue(server.port, "my-agent").exists("/home/user/echo.js"));
  });

  it("SIGTERM stops the server cleanly: exit 0, guests gone", async () => {
    await assertCleanShutdown(server);
  });
});

describe("seed: preview URLs (RivetKit page)", () => {
  const page = "networking-and-previews-rivetkit";
  let server: SeedServer;
  let agent: VmHandle;

  before(async () => {
    server = await startSeedServer(page, {
      "server.ts": "server-preview.ts.txt",
      "common.ts": "common.ts.txt",
      "pi.ts": "pi.ts.txt",
      "client-preview.ts": "client-preview.ts.txt",
      "client-revoke.ts": "client-revoke.ts.txt",
    });
    agent = glue(server.port, ["my-agent"]);
    // Test glue: the web app the seed's client starts with spawn("node", ["/home/user/app.js"]).
    await agent.writeFile("/home/user/app.js", `require("http").createServer((req, res) => res.end("app says hi at " + req.url)).listen(3000);`);
  });

  it("client-preview: createSignedPreviewUrl(3000) and (3000, 300); the preview path reaches the app", async () => {
    const before = Date.now();
    const result = await runClient(server.dir, "client-preview.ts");
    assertRan(result, "client-preview.ts");
    const path = /^Preview path: (\/preview\/\S+\/)$/m.exec(result.stdout)?.[1];
    const token = /^Token: (\S+)$/m.exec(result.stdout)?.[1];
    assert.ok(path && token, `no preview printed: ${result.stdout}`);
    assert.ok(path.includes(token), "the path carries the token");
    assert.match(token, /^[A-Za-z0-9_-]{22,}$/, "at least 128 bits, URL-safe");
    const expires = new Date(/^Expires at: (.+)$/m.exec(result.stdout)![1]!).getTime();
    assert.ok(expires >= before + 3_599_000 && expires <= Date.now() + 3_600_000, "default lifetime is 1 hour");
    assert.match(result.stdout, /^Short-lived preview: \/preview\/\S+\/$/m);
    assert.equal((await agent.listPreviewUrls()).length, 2);
    // The app may still be starting (502 until it listens).
    const response = await waitFor(async () => {
      const answer = await fetch(`http://localhost:${server.port}${path}page`);
      if (answer.status === 502) return undefined;
      return answer;
    }, "the app behind the preview");
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "app says hi at /page");
  });

  it("client-revoke: expireSignedPreviewUrl(token) revokes the token it just made", async () => {
    const before = (await agent.listPreviewUrls()).length;
    const result = await runClient(server.dir, "client-revoke.ts");
    assertRan(result, "client-revoke.ts");
    assert.equal(result.stdout, "");
    assert.equal((await agent.listPreviewUrls()).length, before, "the preview the seed created is no longer active");
  });

  it("SIGTERM stops the server cleanly: exit 0, guests gone", async () => {
    await assertCleanShutdown(server);
  });
});
