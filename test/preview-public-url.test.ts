/**
 * Previews behind a proxy: `preview.publicUrl` is what `preview.url` and the
 * API's redirects name; subdomain mode builds `<token>.<host>` URLs; the
 * preview listener answers only Host names it serves (DNS rebinding).
 */
import assert from "node:assert/strict";
import { request as httpRequest } from "node:http";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { tempDataDir, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;
delete process.env.AGENTVM_PREVIEW_PUBLIC_URL;

const PUBLIC = "https://previews.example.test";
const GUEST = 'require("http").createServer((req, res) => res.end("served " + req.headers.host + " " + req.url)).listen(3000);';

/** GET on the preview listener with a chosen Host header (no DNS needed). */
function getWithHost(server: RunningServer, host: string, path: string): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ host: "127.0.0.1", port: server.previewPort, path, headers: { host } }, (response) => {
      let body = "";
      response.setEncoding("utf8");
      response.on("data", (chunk: string) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode!, body, headers: response.headers }));
    });
    request.on("error", reject);
    request.end();
  });
}

const pathRegistry = setup({ use: { vm: agentOS() } });
const subdomainRegistry = setup({ use: { vm: agentOS() } });

function handle(server: RunningServer, key: string): VmHandle {
  return createClient<typeof pathRegistry>(server.url).vm.getOrCreate(key);
}

async function startGuest(server: RunningServer, key: string): Promise<VmHandle> {
  const vm = handle(server, key);
  await vm.writeFile("/home/agentos/guest.cjs", GUEST);
  await vm.spawn("node", ["/home/agentos/guest.cjs"]);
  await waitFor(async () => (await vm.listeningPorts()).includes(3000), "the guest server", 20_000);
  return vm;
}

describe("path mode with a public URL", () => {
  let server: RunningServer;
  before(async () => {
    server = await pathRegistry.start({ port: 0, dataDir: await tempDataDir("agentvm-public-url-"), handleSignals: false, preview: { publicUrl: PUBLIC } });
  });
  after(() => server?.close());

  it("preview.url is on the public URL; the API's redirect goes there; the listener serves that Host", async () => {
    const vm = await startGuest(server, "public");
    const preview = await vm.createSignedPreviewUrl(3000);
    assert.equal(preview.url, `${PUBLIC}/preview/${preview.token}/`);
    assert.equal(preview.path, `/preview/${preview.token}/`);
    const redirect = await fetch(`${server.url}${preview.path}x`, { redirect: "manual" });
    assert.equal(redirect.status, 307);
    assert.equal(redirect.headers.get("location"), `${PUBLIC}/preview/${preview.token}/x`);
    // What the proxy forwards: Host is the public name.
    const served = await getWithHost(server, "previews.example.test", `${preview.path}hello`);
    assert.equal(served.status, 200, served.body);
    assert.match(served.body, /^served localhost:3000 \/hello$/);
  });

  it("the preview listener refuses a Host it does not serve with HOST_NOT_ALLOWED", async () => {
    const preview = await handle(server, "public").createSignedPreviewUrl(3000);
    const refused = await getWithHost(server, "attacker.example", preview.path);
    assert.equal(refused.status, 403);
    assert.equal(JSON.parse(refused.body).error.code, "HOST_NOT_ALLOWED");
    for (const host of [`localhost:${server.previewPort}`, `127.0.0.1:${server.previewPort}`]) assert.equal((await getWithHost(server, host, preview.path)).status, 200, host);
  });

  it("a public URL with a path, or not http(s), is refused at start", async () => {
    for (const publicUrl of ["https://example.test/previews", "ftp://example.test", "not a url"]) {
      const other = setup({ use: { vm: agentOS() } });
      const error = await other.start({ port: 0, dataDir: await tempDataDir(), handleSignals: false, preview: { publicUrl } }).then(
        () => undefined,
        (caught: { code?: string; message: string }) => caught,
      );
      assert.equal(error?.code, "INVALID_ARGUMENT", publicUrl);
      assert.match(error!.message, /preview\.publicUrl/);
    }
  });
});

describe("subdomain mode", () => {
  let server: RunningServer;
  before(async () => {
    server = await subdomainRegistry.start({ port: 0, dataDir: await tempDataDir("agentvm-subdomain-"), handleSignals: false, preview: { mode: "subdomain", publicUrl: "https://preview.example.test:8443" } });
  });
  after(() => server?.close());

  it("preview.url is <token>.<public host> on the public scheme and port, and that name is served", async () => {
    const vm = await startGuest(server, "sub");
    const preview = await vm.createSignedPreviewUrl(3000);
    assert.equal(preview.url, `https://${preview.token}.preview.example.test:8443/`);
    const served = await getWithHost(server, `${preview.token}.preview.example.test:8443`, "/page");
    assert.equal(served.status, 200, served.body);
    assert.match(served.body, /^served localhost:3000 \/page$/);
    assert.equal((await getWithHost(server, `${preview.token}.elsewhere.test`, "/page")).status, 403);
  });
});
