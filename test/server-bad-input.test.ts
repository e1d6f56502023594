/**
 * The bad-input sweep of issue 10, each finding driven to its limit against a
 * real server (small limits so the limits are reachable), checking the typed
 * answer and that the server still answers afterwards.
 */
import assert from "node:assert/strict";
import { request as httpRequest } from "node:http";
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { createClient } from "agentvm/client";
import { tempDataDir, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;
delete process.env.AGENTVM_TOKEN;

const MAX_BODY = 1024 * 1024;
const MAX_HEADER = 4096;
/** Above what the tests' own fetches open at once (16 in parallel at most). */
const MAX_CONNECTIONS = 32;
const MAX_VMS = 4;
const registry = setup({ use: { vm: agentOS({ sleepAfterMs: 200 }) } });
let server: RunningServer;
let client: ReturnType<typeof createClient<typeof registry>>;

before(async () => {
  server = await registry.start({
    port: 0,
    dataDir: await tempDataDir("agentvm-bad-input-"),
    handleSignals: false,
    limits: { maxBodyBytes: MAX_BODY, maxHeaderBytes: MAX_HEADER, maxConnectionsPerClient: MAX_CONNECTIONS, maxVmsPerDefinition: MAX_VMS },
  });
  client = createClient<typeof registry>(server.url);
});
after(() => server?.close());

async function errorOf(response: Response): Promise<{ status: number; code: string; message: string }> {
  const body = (await response.json()) as { error: { code: string; message: string } };
  assert.equal(response.headers.get("x-agentvm-error"), "1");
  return { status: response.status, ...body.error };
}

function action(key: string, name: string, body: string, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${server.url}/api/vm/${encodeURIComponent(key)}/actions/${name}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
}

async function stillAnswers(): Promise<void> {
  const health = await fetch(`${server.url}/health`);
  assert.equal(health.status, 200);
  await health.body?.cancel();
}

describe("URLs and arguments", () => {
  it("invalid percent-encoding in the definition or key is MALFORMED_REQUEST 400", async () => {
    for (const path of ["/api/%ff/k/status", "/api/vm/%ff/status", "/api/vm/%ff/actions/readdir", "/api/%e0%a4/vms", "/api/vm/%ff%fe?confirm=x"]) {
      const method = path.includes("confirm") ? "DELETE" : path.includes("actions") ? "POST" : "GET";
      const error = await errorOf(await fetch(`${server.url}${path}`, { method, headers: { "content-type": "application/json" }, ...(method === "POST" ? { body: "[]" } : {}) }));
      assert.equal(error.status, 400, `${method} ${path}: ${error.message}`);
      assert.equal(error.code, "MALFORMED_REQUEST");
    }
    await stillAnswers();
  });

  it("200,000 action arguments are MALFORMED_REQUEST 400, not a stack overflow", async () => {
    const args = JSON.stringify(Array.from({ length: 200_000 }, () => 0));
    assert.ok(args.length < MAX_BODY);
    const error = await errorOf(await action("args", "listProcesses", args));
    assert.equal(error.status, 400);
    assert.equal(error.code, "MALFORMED_REQUEST");
    assert.match(error.message, /no action takes more than 8/);
    await stillAnswers();
  });

  it("a value nested 200,000 levels deep is MALFORMED_REQUEST 400", async () => {
    const depth = 200_000; // 400 KB of brackets: under the body cap, far past the nesting cap
    const error = await errorOf(await action("deep", "readdir", `[${"[".repeat(depth)}${"]".repeat(depth)}]`));
    assert.equal(error.status, 400);
    assert.equal(error.code, "MALFORMED_REQUEST");
    assert.match(error.message, /nested more than 64 levels/);
    await stillAnswers();
  });

  it('{"__proto__": {…}} in options is refused as an unknown option, not let through', async () => {
    const body = JSON.stringify({ value: ["/home/agentos/proto/a/b", JSON.parse('{"__proto__": {"recursive": true}}')] });
    assert.match(body, /__proto__/);
    const error = await errorOf(await action("proto", "mkdir", body));
    assert.equal(error.status, 400);
    assert.equal(error.code, "INVALID_ARGUMENT");
    assert.match(error.message, /__proto__/);
    // The same through the envelope format, which rebuilds objects key by key.
    const through = await client.vm.getOrCreate("proto").mkdir("/home/agentos/proto2/a", JSON.parse('{"__proto__": {"recursive": true}}')).then(
      () => undefined,
      (caught: { code?: string }) => caught.code,
    );
    assert.equal(through, "INVALID_ARGUMENT");
    assert.equal(await client.vm.getOrCreate("proto").exists("/home/agentos/proto2"), false);
  });
});

describe("bodies and headers", () => {
  it("an action body over limits.maxBodyBytes is PAYLOAD_TOO_LARGE 413, refused while it streams in", async () => {
    // Chunked, with no content-length: the server only learns the size by reading.
    const result = await new Promise<{ status: number; body: string; sentWhenAnswered: number }>((resolve, reject) => {
      let sent = 0;
      let answered = -1;
      const request = httpRequest(`${server.url}/api/vm/body/actions/writeFile`, { method: "POST", headers: { "content-type": "application/json", "transfer-encoding": "chunked" } }, (response) => {
        answered = sent;
        let body = "";
        response.setEncoding("utf8");
        response.on("data", (chunk: string) => (body += chunk));
        response.on("end", () => resolve({ status: response.statusCode!, body, sentWhenAnswered: answered }));
      });
      request.on("error", (error) => (answered >= 0 ? undefined : reject(error)));
      request.write('{"value": ["/home/agentos/big.txt", "');
      const chunk = "x".repeat(16 * 1024);
      // Up to 64 MiB, one chunk per turn, until the server answers (or cuts the connection).
      const pump = () => {
        if (answered >= 0 || request.destroyed || sent > 64 * 1024 * 1024) return void request.end();
        sent += chunk.length;
        if (request.write(chunk)) setImmediate(pump);
        else request.once("drain", pump);
      };
      pump();
    });
    assert.equal(result.status, 413);
    assert.equal(JSON.parse(result.body).error.code, "PAYLOAD_TOO_LARGE");
    assert.ok(result.sentWhenAnswered < 16 * 1024 * 1024, `the server answered only after ${result.sentWhenAnswered} bytes`);
    // A declared length over the cap is refused before any of it is read.
    const declared = await errorOf(await action("body", "writeFile", JSON.stringify(["/home/agentos/b.txt", "y".repeat(MAX_BODY)])));
    assert.equal(declared.status, 413);
    assert.equal(declared.code, "PAYLOAD_TOO_LARGE");
    await stillAnswers();
  });

  it("headers over limits.maxHeaderBytes are HEADERS_TOO_LARGE 431 with the error shape", async () => {
    const response = await fetch(`${server.url}/health`, { headers: { "x-padding": "p".repeat(MAX_HEADER * 2) } });
    const error = await errorOf(response);
    assert.equal(error.status, 431);
    assert.equal(error.code, "HEADERS_TOO_LARGE");
    await stillAnswers();
  });

  it("a request that is not HTTP is MALFORMED_REQUEST 400", async () => {
    const reply = await rawExchange("NOT HTTP AT ALL\r\n\r\n");
    assert.match(reply, /^HTTP\/1\.1 400/);
    assert.match(reply, /MALFORMED_REQUEST/);
    await stillAnswers();
  });
});

/** Sends bytes on a fresh connection and returns all it answers until it closes. */
function rawExchange(bytes: string, localAddress = "127.0.0.1"): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ port: server.port, host: "127.0.0.1", localAddress });
    let reply = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => (reply += chunk));
    socket.on("error", reject);
    socket.on("close", () => resolve(reply));
    socket.write(bytes);
    setTimeout(() => socket.destroy(), 10_000).unref();
  });
}

describe("connections and VMs", () => {
  it("past limits.maxConnectionsPerClient a new connection is answered TOO_MANY_CONNECTIONS 429; closing some lets clients in again", async () => {
    // From a loopback address of its own, so the other tests' connections do not count.
    const client = "127.0.0.2";
    const held: Socket[] = [];
    try {
      for (let i = 0; i < MAX_CONNECTIONS; i++) {
        const socket = connect({ port: server.port, host: "127.0.0.1", localAddress: client });
        await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
        held.push(socket);
      }
      // Let the server see every one of them before the next.
      await new Promise((resolve) => setTimeout(resolve, 100));
      const reply = await rawExchange("GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n", client);
      assert.match(reply, /^HTTP\/1\.1 429/);
      assert.match(reply, /TOO_MANY_CONNECTIONS/);
    } finally {
      for (const socket of held) socket.destroy();
    }
    await waitFor(async () => {
      const reply = await rawExchange("GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n", client);
      return reply.startsWith("HTTP/1.1 200");
    }, "the server to take connections again");
  });

  it("a status request for a key with no VM creates nothing and keeps nothing in memory", async () => {
    const before = server.actorsInMemory;
    for (let batch = 0; batch < 64; batch++) {
      await Promise.all(
        Array.from({ length: 16 }, async (_, i) => {
          const response = await fetch(`${server.url}/api/vm/nobody-${batch}-${i}/status`);
          assert.equal(response.status, 200);
          const { value } = (await response.json()) as { value: { awake: boolean; createdAt: number | null } };
          assert.deepEqual([value.awake, value.createdAt], [false, null]);
        }),
      );
    }
    assert.ok(server.actorsInMemory <= before, `${server.actorsInMemory} actors in memory after 1024 status requests (was ${before})`);
    assert.equal(server.listVms("vm").filter((vm) => vm.key.startsWith("nobody-")).length, 0);
  });

  it("refused requests on new keys leave no actor behind, and an asleep VM's actor is let go", async () => {
    for (let i = 0; i < 200; i++) {
      const response = await action(`refused-${i}`, "noSuchAction", "[]");
      assert.equal(response.status, 404);
      await response.body?.cancel();
    }
    const handle = client.vm.getOrCreate("sleeper");
    await handle.writeFile("/home/agentos/a.txt", "a");
    assert.ok(server.actorsInMemory >= 1);
    // sleepAfterMs is 200: once asleep the actor goes.
    await waitFor(() => server.actorsInMemory === 0, "every actor to be let go");
    assert.equal(await handle.readFile("/home/agentos/a.txt").then((bytes) => new TextDecoder().decode(bytes)), "a");
  });

  it("past limits.maxVmsPerDefinition a new key is TOO_MANY_VMS 507; a destroy makes room", async () => {
    const existing = server.listVms("vm").length;
    const keys = Array.from({ length: MAX_VMS - existing }, (_, i) => `quota-${i}`);
    for (const key of keys) await client.vm.getOrCreate(key).writeFile("/home/agentos/x", key);
    const error = await errorOf(await action("quota-over", "writeFile", JSON.stringify(["/home/agentos/x", "x"])));
    assert.equal(error.status, 507);
    assert.equal(error.code, "TOO_MANY_VMS");
    assert.match(error.message, /maxVmsPerDefinition/);
    // Existing VMs keep working.
    assert.equal(await client.vm.getOrCreate(keys[0]!).exists("/home/agentos/x"), true);
    await server.destroyVm("vm", keys[0]!);
    await client.vm.getOrCreate("quota-over").writeFile("/home/agentos/x", "now there is room");
    await stillAnswers();
  });
});

describe("preview lifetimes", () => {
  it("TTLs are capped at 7 days by default; one past 2^53 ms is refused, not stored", async () => {
    const handle = client.vm.getOrCreate("quota-1");
    for (const ttl of [8 * 86_400, 1e15, 9e15]) {
      const code = await handle.createSignedPreviewUrl(3000, ttl).then(
        () => "created",
        (error: { code?: string }) => error.code,
      );
      assert.equal(code, "PREVIEW_TTL_TOO_LONG", `ttl ${ttl}`);
    }
    const week = await handle.createSignedPreviewUrl(3000, 7 * 86_400);
    assert.ok(Number.isSafeInteger(week.expiresAt));
  });

  it("a stored row with an expiry past 2^53 (written before the cap) does not break listPreviewUrls", async () => {
    const handle = client.vm.getOrCreate("quota-1");
    await handle.createSignedPreviewUrl(3000, 60);
    const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"));
    try {
      db.prepare("UPDATE previews SET expires_at = ? WHERE key = 'quota-1'").run(2n ** 62n);
    } finally {
      db.close();
    }
    const listed = await handle.listPreviewUrls();
    assert.ok(listed.length >= 1);
    for (const info of listed) assert.equal(info.expiresAt, Number.MAX_SAFE_INTEGER);
  });

  it("preview.maxExpiresInSeconds is itself capped, and validated at definition time", () => {
    assert.throws(() => agentOS({ preview: { maxExpiresInSeconds: 1e12 } }), /preview\.maxExpiresInSeconds must be at most/);
    assert.equal(agentOS().preview.maxExpiresInSeconds, 7 * 86_400);
    // A longer default lifts the default cap with it.
    assert.equal(agentOS({ preview: { defaultExpiresInSeconds: 30 * 86_400 } }).preview.maxExpiresInSeconds, 30 * 86_400);
  });
});
