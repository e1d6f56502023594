/**
 * Who may call the API and from where: API keys, scoped tokens, the Host
 * allowlist and the cross-site checks — against real in-process servers over
 * loopback HTTP, with real guests where a VM is involved.
 */
import assert from "node:assert/strict";
import { request as httpRequest } from "node:http";
import { createServer } from "node:net";
import { after, before, describe, it } from "node:test";
import { agentOS, generateApiKey, hashApiKey, setup, type RunningServer } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { rejection, tempDataDir, text, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;
delete process.env.AGENTVM_TOKEN;

const servers: RunningServer[] = [];
after(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close()));
});

async function start(options: Parameters<ReturnType<typeof setup>["start"]>[0] = {}) {
  const registry = setup({ use: { vm: agentOS() } });
  const server = await registry.start({ port: 0, dataDir: await tempDataDir("agentvm-auth-"), handleSignals: false, ...options });
  servers.push(server);
  return { registry, server };
}

interface RawAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json(): { value?: unknown; error?: { code: string; message: string } };
}

/** One HTTP request with exactly these headers (fetch would add or forbid some: Host, Origin). */
function raw(server: RunningServer, path: string, options: { method?: string; headers?: Record<string, string>; body?: string } = {}): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ host: "127.0.0.1", port: server.port, path, method: options.method ?? "GET", headers: options.headers ?? {} }, (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.on("end", () => {
        const body = Buffer.concat(chunks).toString("utf8");
        resolve({ status: response.statusCode ?? 0, headers: response.headers, text: body, json: () => JSON.parse(body) });
      });
      response.on("error", reject);
    });
    request.on("error", reject);
    request.end(options.body);
  });
}

const JSON_TYPE = { "content-type": "application/json" };
const bearer = (credential: string) => ({ authorization: `Bearer ${credential}` });

async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((done) => probe.listen(0, "127.0.0.1", done));
  const { port } = probe.address() as { port: number };
  await new Promise((done) => probe.close(done));
  return port;
}

describe("open on loopback, refused elsewhere without a key", () => {
  it("without keys on localhost the API answers without credentials, and start-up says it is open", async () => {
    const warnings: string[] = [];
    const warn = console.warn;
    console.warn = (...args: unknown[]) => void warnings.push(args.join(" "));
    let server: RunningServer;
    try {
      ({ server } = await start());
    } finally {
      console.warn = warn;
    }
    assert.equal(server.authRequired, false);
    assert.ok(warnings.some((line) => line.includes(server.url) && /OPEN/.test(line) && /AGENTVM_API_KEYS/.test(line)), warnings.join("\n"));
    const answer = await raw(server, "/api/vm/open/actions/exists", { method: "POST", headers: JSON_TYPE, body: '["/home/agentos"]' });
    assert.equal(answer.status, 200, answer.text);
    assert.deepEqual(answer.json(), { value: true });
    assert.equal(answer.headers["access-control-allow-origin"], undefined);
  });

  it("on 0.0.0.0 without a key start() refuses with AUTH_NOT_CONFIGURED before listening", async () => {
    const port = await freePort();
    const registry = setup({ use: { vm: agentOS() } });
    const error = await rejection(registry.start({ host: "0.0.0.0", port, dataDir: await tempDataDir("agentvm-auth-"), handleSignals: false }));
    assert.equal(error.code, "AUTH_NOT_CONFIGURED");
    assert.match(error.message, /AGENTVM_API_KEYS/);
    assert.match(error.message, /apiKeys/);
    const connect = await rejection(fetch(`http://127.0.0.1:${port}/health`));
    assert.match(String((connect as { cause?: { code?: string } }).cause?.code), /ECONNREFUSED/);
  });

  it("on 0.0.0.0 with a key it starts and requires it", async () => {
    const key = generateApiKey();
    const { server } = await start({ host: "0.0.0.0", auth: { apiKeys: [key] } });
    assert.equal(server.authRequired, true);
    assert.equal((await raw(server, "/api/vm/wide/status")).status, 401);
    assert.equal((await raw(server, "/api/vm/wide/status", { headers: bearer(key) })).status, 200);
  });

  it("a key shorter than 32 characters is refused at start", async () => {
    const error = await rejection(start({ auth: { apiKeys: ["short"] } }));
    assert.equal(error.code, "INVALID_ARGUMENT");
    assert.match(error.message, /32 characters/);
  });
});

describe("API keys", () => {
  const keyA = generateApiKey();
  const keyB = generateApiKey();
  let server: RunningServer;
  before(async () => {
    ({ server } = await start({ auth: { apiKeys: [keyA, { sha256: hashApiKey(keyB) }] } }));
  });

  it("401 UNAUTHENTICATED without a key, with a wrong one, or with a malformed header", async () => {
    for (const headers of [{}, bearer(generateApiKey()), { authorization: keyA }, { authorization: `Basic ${keyA}` }]) {
      const answer = await raw(server, "/api/vm/k/actions/readdir", { method: "POST", headers: { ...JSON_TYPE, ...headers }, body: '["/"]' });
      assert.equal(answer.status, 401, JSON.stringify(headers));
      assert.equal(answer.json().error?.code, "UNAUTHENTICATED");
      assert.equal(answer.headers["x-agentvm-error"], "1");
    }
    assert.equal((await raw(server, "/api/vm/k/status")).status, 401);
    assert.equal((await raw(server, "/nothing/here")).status, 401);
    assert.equal((await raw(server, "/health")).status, 200, "the health probe needs no credentials");
  });

  it("each configured key works (one given by its hash); a revoked key is refused at once", async () => {
    for (const key of [keyA, keyB]) {
      const answer = await raw(server, "/api/vm/k/actions/exists", { method: "POST", headers: { ...JSON_TYPE, ...bearer(key) }, body: '["/tmp"]' });
      assert.equal(answer.status, 200, answer.text);
    }
    assert.equal(server.revokeApiKey(keyB), true);
    const revoked = await raw(server, "/api/vm/k/status", { headers: bearer(keyB) });
    assert.equal(revoked.status, 401);
    assert.match(revoked.json().error!.message, /unknown or revoked/);
    assert.equal((await raw(server, "/api/vm/k/status", { headers: bearer(keyA) })).status, 200);
    server.addApiKey(keyB);
    assert.equal((await raw(server, "/api/vm/k/status", { headers: bearer(keyB) })).status, 200);
  });

  it("revoking every key leaves the API closed, not open", async () => {
    const only = generateApiKey();
    const { server: lone } = await start({ auth: { apiKeys: [only] } });
    lone.revokeApiKey(only);
    assert.equal(lone.authRequired, true);
    assert.equal((await raw(lone, "/api/vm/k/status")).status, 401);
    assert.equal((await raw(lone, "/api/vm/k/status", { headers: bearer(only) })).status, 401);
  });

  it("keys from AGENTVM_API_KEYS (comma-separated, sha256: entries too)", async () => {
    const plain = generateApiKey();
    const hashed = generateApiKey();
    process.env.AGENTVM_API_KEYS = ` ${plain} , sha256:${hashApiKey(hashed)}`;
    let envServer: RunningServer;
    try {
      ({ server: envServer } = await start());
    } finally {
      delete process.env.AGENTVM_API_KEYS;
    }
    assert.equal(envServer.authRequired, true);
    assert.equal((await raw(envServer, "/api/vm/e/status")).status, 401);
    assert.equal((await raw(envServer, "/api/vm/e/status", { headers: bearer(plain) })).status, 200);
    assert.equal((await raw(envServer, "/api/vm/e/status", { headers: bearer(hashed) })).status, 200);
  });
});

describe("scoped tokens", () => {
  const apiKey = generateApiKey();
  let server: RunningServer;
  let registry: ReturnType<typeof setup<{ vm: ReturnType<typeof agentOS> }>>;
  before(async () => {
    ({ server, registry } = await start({ auth: { apiKeys: [apiKey] } }));
  });

  it("a token works on its VM and its actions only: 403 FORBIDDEN on another VM or action", async () => {
    const minted = server.createToken({ key: "alpha", actions: ["writeFile", "readFile"], expiresInSeconds: 60 });
    assert.match(minted.token, /^avt_/);
    assert.equal(minted.definition, "vm");
    assert.ok(minted.expiresAt > Date.now() + 50_000 && minted.expiresAt <= Date.now() + 60_000);
    const alpha = createClient<typeof registry>({ endpoint: server.url, token: minted.token }).vm.getOrCreate("alpha");
    await alpha.writeFile("/home/agentos/a.txt", "scoped");
    assert.equal(text(await alpha.readFile("/home/agentos/a.txt")), "scoped");
    const otherAction = await rejection(alpha.exec("id", []));
    assert.equal(otherAction.code, "FORBIDDEN");
    assert.match(otherAction.message, /exec/);
    const beta = createClient<typeof registry>({ endpoint: server.url, token: minted.token }).vm.getOrCreate("beta");
    const otherVm = await rejection(beta.readFile("/home/agentos/a.txt"));
    assert.equal(otherVm.code, "FORBIDDEN");
    assert.match(otherVm.message, /alpha/);
    const status = await raw(server, "/api/vm/alpha/status", { headers: bearer(minted.token) });
    assert.equal(status.status, 403, "status is not in the token's actions");
  });

  it("a token cannot mint tokens; an API key can, over HTTP; registry.createToken mints in code", async () => {
    const body = JSON.stringify({ key: ["gamma"], actions: ["status"], expiresInSeconds: 30 });
    assert.equal((await raw(server, "/api/tokens", { method: "POST", headers: JSON_TYPE, body })).status, 401);
    const minted = await raw(server, "/api/tokens", { method: "POST", headers: { ...JSON_TYPE, ...bearer(apiKey) }, body });
    assert.equal(minted.status, 200, minted.text);
    const token = (minted.json().value as { token: string; key: string }).token;
    assert.equal((minted.json().value as { key: string }).key, "gamma");
    assert.equal((await raw(server, "/api/vm/gamma/status", { headers: bearer(token) })).status, 200);
    const byToken = await raw(server, "/api/tokens", { method: "POST", headers: { ...JSON_TYPE, ...bearer(token) }, body });
    assert.equal(byToken.status, 403);
    assert.equal(byToken.json().error?.code, "FORBIDDEN");
    const bad = await raw(server, "/api/tokens", { method: "POST", headers: { ...JSON_TYPE, ...bearer(apiKey) }, body: JSON.stringify({ key: "g", actions: ["formatDisk"] }) });
    assert.equal(bad.status, 400);
    assert.match(bad.json().error!.message, /formatDisk/);
    const tooLong = await raw(server, "/api/tokens", { method: "POST", headers: { ...JSON_TYPE, ...bearer(apiKey) }, body: JSON.stringify({ key: "g", expiresInSeconds: 10 ** 9 }) });
    assert.equal(tooLong.status, 400);
    assert.match(tooLong.json().error!.message, /maxTokenTtlSeconds/);
    const inCode = await registry.createToken({ key: "gamma", actions: "*" });
    assert.equal((await raw(server, "/api/vm/gamma/status", { headers: bearer(inCode.token) })).status, 200);
  });

  it("an expired token, or one changed or signed elsewhere, is 401", async () => {
    // Long enough that the first request is inside it even on a loaded machine; then wait for it to run out.
    const short = server.createToken({ key: "delta", expiresInSeconds: 2 });
    assert.equal((await raw(server, "/api/vm/delta/status", { headers: bearer(short.token) })).status, 200);
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, short.expiresAt - Date.now() + 50)));
    const expired = await raw(server, "/api/vm/delta/status", { headers: bearer(short.token) });
    assert.equal(expired.status, 401);
    assert.match(expired.json().error!.message, /expired/);
    const good = server.createToken({ key: "delta", actions: ["status"] });
    const [payload, mac] = good.token.slice(4).split(".") as [string, string];
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString()) as Record<string, unknown>;
    const widened = `avt_${Buffer.from(JSON.stringify({ ...claims, a: "*" })).toString("base64url")}.${mac}`;
    assert.equal((await raw(server, "/api/vm/delta/status", { headers: bearer(widened) })).status, 401);
    const { server: other } = await start({ auth: { apiKeys: [generateApiKey()] } });
    const foreign = other.createToken({ key: "delta" });
    assert.equal((await raw(server, "/api/vm/delta/status", { headers: bearer(foreign.token) })).status, 401);
  });

  it("the client reads AGENTVM_TOKEN when no token is given; an explicit token wins", async () => {
    const minted = server.createToken({ key: "env", actions: ["exists"] });
    process.env.AGENTVM_TOKEN = minted.token;
    try {
      const fromEnv = createClient<typeof registry>(server.url).vm.getOrCreate("env");
      assert.equal(await fromEnv.exists("/home/agentos"), true);
      const explicit = createClient<typeof registry>({ endpoint: server.url, token: "avt_not.valid" }).vm.getOrCreate("env");
      assert.equal((await rejection(explicit.exists("/home/agentos"))).code, "UNAUTHENTICATED");
    } finally {
      delete process.env.AGENTVM_TOKEN;
    }
    const none = createClient<typeof registry>(server.url).vm.getOrCreate("env");
    assert.equal((await rejection(none.exists("/home/agentos"))).code, "UNAUTHENTICATED");
  });

  describe("with a guest server", () => {
    let vm: VmHandle;
    before(async () => {
      vm = createClient<typeof registry>({ endpoint: server.url, token: apiKey }).vm.getOrCreate("guest");
      await vm.writeFile(
        "/home/agentos/echo.js",
        `require("http").createServer((q, s) => { s.setHeader("content-type", "application/json"); s.end(JSON.stringify({ url: q.url, authorization: q.headers.authorization || null, agentvm: q.headers["x-agentvm-authorization"] || null })); }).listen(3000);`,
      );
      await vm.spawn("node", ["/home/agentos/echo.js"]);
      await waitFor(async () => (await vm.vmFetch(3000, "/").catch(() => undefined))?.status === 200, "the guest echo server");
    });

    it("vmFetch passes the guest's own Authorization header; the server's credential never reaches the guest", async () => {
      const withGuestAuth = await vm.vmFetch(3000, "/x", { headers: { authorization: "Bearer for-the-guest" } });
      assert.deepEqual(JSON.parse(text(withGuestAuth.body)), { url: "/x", authorization: "Bearer for-the-guest", agentvm: null });
      const curlStyle = await raw(server, "/api/vm/guest/fetch/3000/y", { headers: bearer(apiKey) });
      assert.deepEqual(JSON.parse(curlStyle.text), { url: "/y", authorization: null, agentvm: null });
    });

    it("a token scoped to vmFetch can fetch but not run programs", async () => {
      const minted = server.createToken({ key: "guest", actions: ["vmFetch"] });
      const scoped = createClient<typeof registry>({ endpoint: server.url, token: minted.token }).vm.getOrCreate("guest");
      assert.equal((await scoped.vmFetch(3000, "/z")).status, 200);
      assert.equal((await rejection(scoped.spawn("id", []))).code, "FORBIDDEN");
    });

    it("previews stay reachable with no API credentials, with their own CORS", async () => {
      const preview = await vm.createSignedPreviewUrl(3000, 60);
      const answer = await fetch(`${server.url}${preview.path}hello`);
      assert.equal(answer.status, 200);
      assert.equal(answer.headers.get("access-control-allow-origin"), "*");
      assert.equal(((await answer.json()) as { url: string }).url, "/hello");
    });
  });
});

describe("Host and origin checks", () => {
  const apiKey = generateApiKey();
  let server: RunningServer;
  let open: RunningServer;
  before(async () => {
    ({ server } = await start({ auth: { apiKeys: [apiKey] }, allowedHosts: ["agents.example.com", ".internal.example"], allowedOrigins: ["https://app.example.com"] }));
    ({ server: open } = await start());
  });

  const exists = (target: RunningServer, headers: Record<string, string>) =>
    raw(target, "/api/vm/o/actions/exists", { method: "POST", headers: { ...JSON_TYPE, ...bearer(apiKey), ...headers }, body: '["/tmp"]' });

  it("a foreign Host header is refused (DNS rebinding), on the open server too; loopback names, IPs and allowedHosts pass", async () => {
    for (const target of [server, open]) {
      const refused = await exists(target, { host: `evil.example:${target.port}` });
      assert.equal(refused.status, 403);
      assert.equal(refused.json().error?.code, "HOST_NOT_ALLOWED");
      assert.match(refused.json().error!.message, /allowedHosts/);
    }
    for (const host of ["localhost", "127.0.0.1", "[::1]", "10.1.2.3", "agents.example.com", "a.internal.example", "internal.example"]) {
      const answer = await exists(server, { host: `${host}:${server.port}` });
      assert.equal(answer.status, 200, `${host}: ${answer.text}`);
    }
    assert.equal((await exists(server, { host: "evilinternal.example" })).status, 403);
  });

  it("a cross-site text/plain or form POST is refused with 415, even with a valid key", async () => {
    for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]) {
      for (const target of [server, open]) {
        const answer = await exists(target, { "content-type": type });
        assert.equal(answer.status, 415, type);
        assert.equal(answer.json().error?.code, "UNSUPPORTED_MEDIA_TYPE");
      }
    }
    const form = await raw(server, "/api/vm/o/fetch/3000/submit", { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded", ...bearer(apiKey) }, body: "a=b" });
    assert.equal(form.status, 415);
    assert.match(form.json().error!.message, /x-agentvm-forward-headers/);
    const tokens = await raw(server, "/api/tokens", { method: "POST", headers: { "content-type": "text/plain", ...bearer(apiKey) }, body: '{"key":"o"}' });
    assert.equal(tokens.status, 415);
  });

  it("a request with Origin: https://evil.example or Sec-Fetch-Site: cross-site is refused; the API's own origin and allowedOrigins pass", async () => {
    for (const target of [server, open]) {
      for (const headers of [{ origin: "https://evil.example" }, { origin: "null" }, { "sec-fetch-site": "cross-site" }, { "sec-fetch-site": "same-site" }] as Record<string, string>[]) {
        const answer = await exists(target, headers);
        assert.equal(answer.status, 403, JSON.stringify(headers));
        assert.equal(answer.json().error?.code, "ORIGIN_NOT_ALLOWED");
        assert.equal(answer.headers["access-control-allow-origin"], undefined);
      }
      const preflight = await raw(target, "/api/vm/o/actions/exists", { method: "OPTIONS", headers: { origin: "https://evil.example", "access-control-request-method": "POST" } });
      assert.equal(preflight.headers["access-control-allow-origin"], undefined);
    }
    for (const headers of [{ origin: `http://127.0.0.1:${server.port}`, "sec-fetch-site": "same-origin" }, { origin: "https://app.example.com", "sec-fetch-site": "cross-site" }, { "sec-fetch-site": "none" }] as Record<string, string>[]) {
      const answer = await exists(server, headers);
      assert.equal(answer.status, 200, `${JSON.stringify(headers)}: ${answer.text}`);
      assert.equal(answer.headers["access-control-allow-origin"], undefined);
    }
  });
});
